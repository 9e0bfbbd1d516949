#!/usr/bin/env bash
# Two builds of `switchboard serve` side by side, in one run: idle memory per seed-protocol connection
# (10,000 held) and seed-protocol fan-out (1 publisher -> 1,000 subscribers) with the server's CPU per
# delivery. For checking a change against the commit before it:
#
#   git worktree add /tmp/before HEAD~1 && (cd /tmp/before && cargo build --release -p switchboard)
#   cargo build --release -p switchboard
#   benches/serve_compare.sh /tmp/before/target/release/switchboard target/release/switchboard
#
# Servers run on core 0, the load generator (the second binary's `bench`) on core 1; the two builds
# alternate within each round (RUNS=3 rounds, RATES="1000 2000" messages/s, SECONDS=5 per cell).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
[ $# -eq 2 ] || { echo "usage: $0 BEFORE_BINARY AFTER_BINARY" >&2; exit 2; }
before=$(realpath "$1") after=$(realpath "$2")
runs=${RUNS:-3} rates=${RATES:-"1000 2000"} seconds=${SECONDS_PER_CELL:-5}
out=target/serve-compare
rm -rf "$out" && mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
start() {
    SWITCHBOARD_LOG=warn taskset -c 0 "$1" serve --listen "127.0.0.1:$2" --db "$out/db-$2.db" \
        --rate-limit 0 --keepalive-secs 0 --compression false &
    pid=$!
    wait_port "$2" || { echo "$1 did not start" >&2; exit 1; }
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; rm -f "$out"/db-*; }
load() { taskset -c 1 "$after" bench "$@" --json 2>/dev/null; }
for run in $(seq "$runs"); do
    for which in before after; do
        bin=${!which} port=$(free_port)
        start "$bin" "$port"
        echo "idle run $run: $which" >&2
        load idle "ws://127.0.0.1:$port/ws" -c 10000 --hold 3 --server-pid "$pid" >"$out/idle-$which-$run.json" || true
        stop
    done
done
for run in $(seq "$runs"); do
    for rate in $rates; do
        for which in before after; do
            bin=${!which} port=$(free_port)
            start "$bin" "$port"
            echo "fanout run $run: $which at $rate/s" >&2
            load fanout "ws://127.0.0.1:$port/ws" --subscribers 1000 --rate "$rate" -d "$seconds" --server-pid "$pid" \
                >"$out/fanout-$which-$rate-$run.json" || echo '{}' >"$out/fanout-$which-$rate-$run.json"
            stop
        done
    done
done
python3 - "$out" "$rates" <<'PY'
import glob, json, statistics, sys
out, rates = sys.argv[1], sys.argv[2].split()
def rows(pattern):
    found = []
    for path in sorted(glob.glob(f"{out}/{pattern}")):
        try:
            found.append(json.load(open(path)))
        except ValueError:
            pass
    return found
def median(rs, key):
    values = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(values) if values else None
print("| build | runtime | idle KiB per connection (10,000) |\n|---|---|---|")
for which in ["before", "after"]:
    rs = rows(f"idle-{which}-*.json")
    each = ", ".join(f"{r['server_kib_per_connection']:.2f}" for r in rs if r.get("server_kib_per_connection"))
    print(f"| {which} | tokio multi-thread | {median(rs, 'server_kib_per_connection'):.2f} ({each}) |")
print("\n| build | runtime | rate/s | deliveries/s | p99 | lost | server CPU per delivery |\n|---|---|---|---|---|---|---|")
for rate in rates:
    for which in ["before", "after"]:
        rs = rows(f"fanout-{which}-{rate}-*.json")
        cpu = ", ".join(f"{r['server_cpu_us_per_delivery']:.3f}" for r in rs if r.get("server_cpu_us_per_delivery"))
        print(f"| {which} | tokio multi-thread | {rate} | {median(rs, 'deliveries_per_s'):,.0f} | {median(rs, 'p99_us') / 1000:.1f} ms | "
              f"{median(rs, 'lost'):,.0f} | {median(rs, 'server_cpu_us_per_delivery'):.3f} µs ({cpu}) |")
PY
