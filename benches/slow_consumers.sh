#!/usr/bin/env bash
# Delivery latency in a room with and without stalled members: `switchboard bench fanout` against
# `switchboard serve`, SUBSCRIBERS members, one publisher at RATE messages/s of SIZE bytes, first with
# every member reading, then with 10% that join and never read. Server and load are pinned to
# separate cores; the two cases alternate, RUNS times each, and the medians are reported.
#
# Usage: benches/slow_consumers.sh [SUBSCRIBERS=200] [RATE=200] [SIZE=4096] [SECONDS=20] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
subscribers=${1:-200}
rate=${2:-200}
size=${3:-4096}
seconds=${4:-20}
runs=${5:-3}
out=target/slow-consumers
rm -rf "$out" && mkdir -p "$out"
cargo build --release --locked -p switchboard >&2
bin=target/release/switchboard
ulimit -n 65536 2>/dev/null || true

run_case() { # run_case STALLED_PERCENT RUN
    local port pid
    port=$(free_port)
    SWITCHBOARD_LOG=warn taskset -c 0 "$bin" serve --listen "127.0.0.1:$port" --db "$out/run-$1-$2.db" \
        --rate-limit 0 --max-message-chars 8192 &
    pid=$!
    wait_port "$port"
    taskset -c 1 "$bin" bench fanout "ws://127.0.0.1:$port/ws" --subscribers "$subscribers" --rate "$rate" \
        --size "$size" -d "$seconds" --stalled-percent "$1" --json >"$out/stalled-$1-run-$2.json" 2>/dev/null
    kill "$pid" && wait "$pid" 2>/dev/null || true
}

for run in $(seq "$runs"); do
    for stalled in 0 10; do
        echo "run $run, ${stalled}% stalled" >&2
        run_case "$stalled" "$run"
    done
done

python3 - "$out" "$runs" <<'EOF'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows = {}
for stalled in (0, 10):
    results = [json.load(open(f"{out}/stalled-{stalled}-run-{r}.json")) for r in range(1, runs + 1)]
    med = lambda key: statistics.median(r[key] for r in results)
    rows[stalled] = {k: med(k) for k in ("deliveries_per_s", "p50_us", "p99_us", "p999_us", "lost")}
    rows[stalled]["stalled"] = results[0]["stalled"]
    rows[stalled]["readers"] = results[0]["subscribers"] - results[0]["stalled"]
print("| stalled members | reading members | deliveries/s | p50 | p99 | p99.9 | lost |")
print("|---|---|---|---|---|---|---|")
for stalled, r in rows.items():
    print(f"| {r['stalled']} ({stalled}%) | {r['readers']} | {r['deliveries_per_s']:,.0f} | {r['p50_us'] / 1000:.2f} ms "
          f"| {r['p99_us'] / 1000:.2f} ms | {r['p999_us'] / 1000:.2f} ms | {r['lost']:.0f} |")
ratio = rows[10]["p99_us"] / rows[0]["p99_us"] if rows[0]["p99_us"] else float("nan")
print(f"\np99 with 10% stalled / p99 without: {ratio:.2f} (medians of {runs} runs)")
EOF
