#!/usr/bin/env bash
# Cluster fan-out, measured in one run on this machine: 1 publisher on node 1 -> SUBSCRIBERS
# (default 1,000) spread over the nodes in turn, at each of RATES messages/s, for SECONDS per cell.
#
#   benches/cluster.sh            (RATES="100 300 1000 2000" SUBSCRIBERS=1000 SECONDS_PER_CELL=5 RUNS=1)
#
# Three setups, interleaved within each round:
# - serve-1:        one `switchboard serve` (SQLite), the single-node baseline;
# - switchboard-3:  three `switchboard serve --redis` nodes on one redis-server;
# - socketio-3:     three Socket.IO 4 nodes with @socket.io/redis-adapter on one redis-server
#                   (benches/peers/socketio_cluster.js, as the adapter's README sets it up).
# Servers and Redis run on core 0, the load generator (`switchboard bench fanout`) on core 1. Redis
# runs without persistence for both clusters (the adapter keeps no history anyway). Reported:
# deliveries/s, p50/p99 latency, losses, server CPU per delivery (all nodes), Redis CPU per published
# message, and Redis commands per publish (INFO commandstats: the client's calls, EVAL or PUBLISH, and
# every command Redis ran, the ones inside scripts included). Results: target/cluster-bench/*.json and the markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
root=$PWD
rates=${RATES:-"100 300 1000 2000"}
subscribers=${SUBSCRIBERS:-1000}
seconds=${SECONDS_PER_CELL:-5}
runs=${RUNS:-1}
out=$root/target/cluster-bench
rm -rf "$out" && mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"

echo "building" >&2
cargo build --release --locked -p switchboard >&2
(cd benches/peers && npm ci --no-audit --no-fund --loglevel=error >&2)
sb=$root/target/release/switchboard

pids=()
start_redis() {
    redis_port=$(free_port)
    taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$out" >/dev/null &
    redis_pid=$!
    wait_port "$redis_port" || { echo "redis-server did not start" >&2; exit 1; }
}
start_nodes() { # SETUP: sets $urls and $pids
    local setup=$1 n port
    urls="" pids=()
    case $setup in
        serve-1) n=1 ;;
        *) n=3 ;;
    esac
    for i in $(seq "$n"); do
        port=$(free_port)
        case $setup in
            serve-1)
                SWITCHBOARD_LOG=warn taskset -c 0 "$sb" serve --listen "127.0.0.1:$port" --db "$out/serve.db" \
                    --rate-limit 0 --keepalive-secs 0 --compression false & ;;
            switchboard-3)
                SWITCHBOARD_LOG=warn taskset -c 0 "$sb" serve --listen "127.0.0.1:$port" --db "$out/unused.db" \
                    --redis "redis://127.0.0.1:$redis_port/" --rate-limit 0 --keepalive-secs 0 --compression false & ;;
            socketio-3)
                (cd benches/peers && exec taskset -c 0 node socketio_cluster.js "$port" "redis://127.0.0.1:$redis_port/" 2>/dev/null) & ;;
        esac
        pids+=($!)
        wait_port "$port" || { echo "$setup node $i did not start" >&2; exit 1; }
        case $setup in
            socketio-3) urls+="${urls:+,}ws://127.0.0.1:$port" ;;
            *) urls+="${urls:+,}ws://127.0.0.1:$port/ws" ;;
        esac
    done
}
stop_all() {
    for pid in "${pids[@]}" "$redis_pid"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}" "$redis_pid"; do wait "$pid" 2>/dev/null || true; done
    rm -f "$out"/*.db "$out"/*.db-*
}
# Redis' own CPU seconds (user + system, to the microsecond), from INFO cpu.
redis_cpu() { redis-cli -p "$redis_port" INFO cpu | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'; }
commands() { # calls per command since CONFIG RESETSTAT, as JSON (commands run inside scripts count too)
    redis-cli -p "$redis_port" INFO commandstats |
        python3 -c 'import sys, re, json; print(json.dumps({m.group(1): int(m.group(2)) for m in (re.match(r"cmdstat_(\S+):calls=(\d+)", l) for l in sys.stdin) if m}))'
}

for run in $(seq "$runs"); do
    for rate in $rates; do
        for setup in serve-1 switchboard-3 socketio-3; do
            start_redis
            start_nodes "$setup"
            # Seed-protocol clients: chat messages only, no presence events, like the Socket.IO peer.
            protocol=seed
            [ "$setup" = socketio-3 ] && protocol=socketio
            redis-cli -p "$redis_port" CONFIG RESETSTAT >/dev/null
            redis_before=$(redis_cpu)
            echo "run $run: $setup 1 -> $subscribers at $rate/s" >&2
            pid_list=$(IFS=,; echo "${pids[*]}")
            taskset -c 1 "$sb" bench fanout "$urls" --protocol "$protocol" --room bench --subscribers "$subscribers" \
                --rate "$rate" -d "$seconds" --server-pid "$pid_list" --json 2>/dev/null \
                >"$out/$setup-$rate-$run.json" || echo '{}' >"$out/$setup-$rate-$run.json"
            redis_after=$(redis_cpu)
            calls=$(commands)
            python3 - "$out/$setup-$rate-$run.json" "$redis_before" "$redis_after" "$calls" "$setup" <<'EOF'
import json, sys
path, before, after, calls, setup = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
r = json.load(open(path))
published = r.get("published") or 0
r["setup"] = setup
if setup != "serve-1" and published:
    r["redis_cpu_us_per_publish"] = (after - before) * 1e6 / published
    r["redis_commands"] = calls
    # What a client sends per message: switchboard one EVAL, Socket.IO's adapter one PUBLISH; and
    # every command Redis ran, those inside the script included.
    r["redis_calls_per_publish"] = calls.get("eval", calls.get("publish", 0)) / published
    r["redis_all_calls_per_publish"] = sum(calls.values()) / published
json.dump(r, open(path, "w"))
EOF
            stop_all
        done
    done
done

python3 - "$out" "$rates" <<'EOF'
import glob, json, os, statistics, sys
out, rates = sys.argv[1], [int(r) for r in sys.argv[2].split()]
def cells(setup, rate):
    return [json.load(open(p)) for p in glob.glob(os.path.join(out, f"{setup}-{rate}-*.json"))]
def med(rs, key):
    vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None
def fmt(v, digits=0, unit=""):
    return "-" if v is None else f"{v:,.{digits}f}{unit}"
print("| msgs/s | setup | runtime | deliveries/s | p50 | p99 | lost | server CPU µs/delivery | Redis CPU µs/publish | Redis calls/publish (all) |")
print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
for rate in rates:
    for setup in ["serve-1", "switchboard-3", "socketio-3"]:
        rs = cells(setup, rate)
        calls = med(rs, "redis_calls_per_publish")
        every = med(rs, "redis_all_calls_per_publish")
        runtime = "Node event loop" if setup.startswith("socketio") else "tokio multi-thread"
        print(f"| {rate} | {setup} | {runtime} | {fmt(med(rs, 'deliveries_per_s'))} | {fmt(med(rs, 'p50_us'), 0, ' µs')} | "
              f"{fmt(med(rs, 'p99_us'), 0, ' µs')} | {fmt(med(rs, 'lost'))} | {fmt(med(rs, 'server_cpu_us_per_delivery'), 3)} | "
              f"{fmt(med(rs, 'redis_cpu_us_per_publish'), 1)} | {fmt(calls, 2)} ({fmt(every, 2)}) |")
print()
for rate in rates:
    one, sb3, sio = (cells(s, rate) for s in ["serve-1", "switchboard-3", "socketio-3"])
    cpu1, cpu3 = med(one, "server_cpu_us_per_delivery"), med(sb3, "server_cpu_us_per_delivery")
    d3, dsio = med(sb3, "deliveries_per_s"), med(sio, "deliveries_per_s")
    parts = []
    if cpu1 and cpu3:
        parts.append(f"switchboard-3 / serve-1 CPU per delivery {cpu3 / cpu1:.2f}×")
    if d3 and dsio:
        parts.append(f"switchboard-3 / socketio-3 deliveries/s {d3 / dsio:.2f}×")
    print(f"- {rate}/s: " + "; ".join(parts))
EOF
