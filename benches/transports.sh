#!/usr/bin/env bash
# The chat's transports side by side, in one run: 1 publisher (switchboard.v1 over WebSocket) ->
# SUBSCRIBERS (default 1,000) on WebSocket (`switchboard.v1`), on Server-Sent Events (`GET /sse`) or
# long polling (`GET /poll`, each poller on a keep-alive connection from each answer's cursor),
# at each of RATES messages/s for SECONDS per cell; deliveries/s, p50/p99 and the server's CPU per
# delivery. `serve` runs on core 0, the load generator on core 1; the transports alternate in each round.
#
#   benches/transports.sh        (RATES="100 1000" SUBSCRIBERS=1000 SECONDS_PER_CELL=5 RUNS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
rates=${RATES:-"100 1000"} subscribers=${SUBSCRIBERS:-1000} seconds=${SECONDS_PER_CELL:-5} runs=${RUNS:-2}
out=target/transports-bench
rm -rf "$out" && mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -p switchboard >&2
sb=target/release/switchboard
for run in $(seq "$runs"); do
    for rate in $rates; do
        for transport in v1 sse longpoll; do
            port=$(free_port)
            SWITCHBOARD_LOG=warn taskset -c 0 "$sb" serve --listen "127.0.0.1:$port" --db "$out/chat.db" \
                --rate-limit 0 --keepalive-secs 0 --compression false &
            pid=$!
            wait_port "$port" || { echo "serve did not start" >&2; exit 1; }
            echo "run $run: $transport 1 -> $subscribers at $rate/s" >&2
            taskset -c 1 "$sb" bench fanout "ws://127.0.0.1:$port/ws" --protocol "$transport" --room bench \
                --subscribers "$subscribers" --rate "$rate" -d "$seconds" --server-pid "$pid" --json 2>/dev/null \
                >"$out/$transport-$rate-$run.json" || echo '{}' >"$out/$transport-$rate-$run.json"
            kill "$pid"; wait "$pid" 2>/dev/null || true
            rm -f "$out"/chat.db*
        done
    done
done
python3 - "$out" "$rates" <<'PY'
import glob, json, os, statistics, sys
out, rates = sys.argv[1], [int(r) for r in sys.argv[2].split()]
def med(rs, key):
    vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None
print("| msgs/s | transport | runtime | deliveries/s | p50 | p99 | lost | server CPU µs/delivery |")
print("|---:|---|---|---:|---:|---:|---:|---:|")
cpu = {}
for rate in rates:
    for t, label in [("v1", "websocket"), ("sse", "sse"), ("longpoll", "longpoll")]:
        rs = [json.load(open(p)) for p in glob.glob(os.path.join(out, f"{t}-{rate}-*.json"))]
        cpu[(t, rate)] = med(rs, "server_cpu_us_per_delivery")
        f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
        print(f"| {rate} | {label} | tokio multi-thread | {f(med(rs, 'deliveries_per_s'))} | {f(med(rs, 'p50_us'))} µs | {f(med(rs, 'p99_us'))} µs | {f(med(rs, 'lost'))} | {f(cpu[(t, rate)], 3)} |")
print()
for rate in rates:
    for t in ["sse", "longpoll"]:
        if cpu.get(("v1", rate)) and cpu.get((t, rate)):
            print(f"- {rate}/s: {t} / WebSocket server CPU per delivery {cpu[(t, rate)] / cpu[('v1', rate)]:.2f}×")
PY
