#!/usr/bin/env bash
# Soak test of `switchboard serve`: IDLE connections held open plus CHURN clients that connect, join,
# publish, read their acks and leave, over and over, for MINUTES. Every 30 s it samples the server's
# RSS, open file descriptors and live tokio tasks (from /metrics) into a CSV, and at the end checks:
#   - RSS after the warm-up (the first sixth of the run) stays within 10% of its value then;
#   - once the load is gone, file descriptors and tasks are back to their values before it started.
#
# Usage: benches/soak.sh [MINUTES=30] [IDLE=9000] [CHURN=1000]   (exit 1 if a check fails)
# Results: target/soak/samples.csv, target/soak/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
minutes=${1:-30}
idle=${2:-9000}
churn=${3:-1000}
seconds=$((minutes * 60))
out=target/soak
rm -rf "$out" && mkdir -p "$out"

cargo build --release --locked -p switchboard >&2
# A copy, so rebuilding during a long soak does not touch the binary under test.
cp target/release/switchboard "$out/switchboard"
bin=$out/switchboard
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
port=$(free_port)
url="ws://127.0.0.1:$port/ws"

# Idle clients speak the seed protocol, so they sit in the default room "idle", where nobody chats.
SWITCHBOARD_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --db "$out/soak.db" --default-room idle \
    --rate-limit 0 --max-connections-per-ip 100000 --history-max-messages 100 2>"$out/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true' EXIT
wait_port "$port"

metric() { # metric NAME: one gauge from /metrics
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n' >&3
    awk -v k="$1" '$1 == k { print $2 }' <&3
    exec 3<&-
}
sample() { # elapsed_s rss_kib fds tasks sessions
    local rss fds
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    echo "$1,$rss,$fds,$(metric switchboard_tasks),$(metric switchboard_sessions)"
}

echo "elapsed_s,rss_kib,fds,tasks,sessions" >"$out/samples.csv"
sleep 1
baseline=$(sample 0)
echo "$baseline" >>"$out/samples.csv"

sources=$(seq -s, -f '127.0.0.%g' 2 9)
"$bin" bench idle "$url" -c "$idle" --hold "$seconds" --source-ips "$sources" --json >"$out/idle.json" 2>"$out/idle.log" &
idle_job=$!
"$bin" bench churn "$url" -c "$churn" --messages 5 --pause-ms 1000 -d "$seconds" --json >"$out/churn.json" 2>"$out/churn.log" &
churn_job=$!

start=$(date +%s)
while kill -0 "$churn_job" 2>/dev/null || kill -0 "$idle_job" 2>/dev/null; do
    sleep 30
    sample $(($(date +%s) - start)) | tee -a "$out/samples.csv" >&2
done
wait "$idle_job" "$churn_job" || true
sleep 10 # let the server finish the last close handshakes
after=$(sample $(($(date +%s) - start)))
echo "$after" >>"$out/samples.csv"

python3 - "$out" "$seconds" "$baseline" "$after" "$idle" "$churn" <<'EOF' | tee "$out/summary.txt"
import csv, json, sys
out, seconds, baseline, after, idle, churn = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
rows = [r for r in csv.DictReader(open(f"{out}/samples.csv"))]
loaded = [r for r in rows[1:-1]]
warm = seconds / 6
steady = [int(r["rss_kib"]) for r in loaded if int(r["elapsed_s"]) >= warm]
b = dict(zip(["elapsed_s", "rss_kib", "fds", "tasks", "sessions"], baseline.split(",")))
a = dict(zip(["elapsed_s", "rss_kib", "fds", "tasks", "sessions"], after.split(",")))
churned = json.load(open(f"{out}/churn.json"))
held = json.load(open(f"{out}/idle.json"))
peak_sessions = max(int(r["sessions"] or 0) for r in loaded) if loaded else 0
ok = True
print(f"soak: {seconds // 60} min, {held['opened']} idle + {churn} churning clients "
      f"(peak {peak_sessions} sessions), {churned['sessions']} churn sessions, {churned['acked']} messages acked, "
      f"{churned['errors']} churn errors, {held['errors']} idle errors")
if steady:
    first, low, high = steady[0], min(steady), max(steady)
    drift = (high - first) / first * 100
    flat = high <= first * 1.10 and low >= first * 0.90
    ok &= flat
    print(f"RSS after warm-up: {first} KiB at {warm:.0f} s, min {low}, max {high} ({drift:+.1f}% max drift): "
          f"{'flat' if flat else 'NOT FLAT'} within 10%")
for key in ["fds", "tasks"]:
    back = int(a[key]) <= int(b[key])
    ok &= back
    print(f"{key}: {b[key]} before the load, {a[key]} after it: {'back to baseline' if back else 'LEAKED'}")
print("result:", "pass" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
