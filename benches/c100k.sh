#!/usr/bin/env bash
# CONNECTIONS concurrent WebSocket connections held on this machine, with the servers' RSS.
#
# One process may not open more than `ulimit -Hn` descriptors (20,000 on this machine kind, and the
# limit cannot be raised here), so PROCESSES `switchboard echo` servers share one port with
# SO_REUSEPORT (`--reuse-port`; the kernel spreads new connections across them), pinned to core 0.
# PROCESSES `switchboard bench idle` clients on core 1 open CONNECTIONS / PROCESSES each, from their
# own eight 127.0.x.y source addresses (past the ephemeral-port limit), answer keepalive pings and
# hold for HOLD seconds. Every 2 s the script counts established server-side sockets and sums the
# servers' RSS; the report is the sample with the most connections.
#
# Usage: benches/c100k.sh [CONNECTIONS=100000] [PROCESSES=6] [HOLD=30]
# Result: target/c100k/summary.txt (also printed).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
total=${1:-100000}
procs=${2:-6}
hold=${3:-30}
out=target/c100k
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -p switchboard >&2
sb=target/release/switchboard

port=$(free_port)
servers=()
for _ in $(seq "$procs"); do
    taskset -c 0 "$sb" echo --listen "127.0.0.1:$port" --no-compression --reuse-port 2>/dev/null &
    servers+=($!)
done
clients=()
cleanup() { kill "${servers[@]}" "${clients[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_port "$port" || { echo "servers did not start" >&2; exit 1; }
sleep 1

server_rss_kib() {
    local sum=0 pid
    for pid in "${servers[@]}"; do sum=$((sum + $(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status"))); done
    echo "$sum"
}
established() { ss -Htn state established "( sport = :$port )" src 127.0.0.1 | wc -l; }

before=$(server_rss_kib)
each=$((total / procs))
for i in $(seq 0 $((procs - 1))); do
    sources=$(seq -s, -f "127.0.$((i + 1)).%g" 1 8)
    taskset -c 1 "$sb" bench idle "ws://127.0.0.1:$port/" -c "$each" --hold "$hold" --source-ips "$sources" --json \
        >"$out/client-$i.json" 2>/dev/null &
    clients+=($!)
done

best=0
best_rss=0
while kill -0 "${clients[@]}" 2>/dev/null; do
    sleep 2
    held=$(established)
    if [ "$held" -gt "$best" ]; then
        best=$held
        best_rss=$(server_rss_kib)
        per_process=$(for pid in "${servers[@]}"; do ls "/proc/$pid/fd" | wc -l; done | paste -sd' ')
    fi
done
wait "${clients[@]}" || true
opened=$(python3 -c 'import json,sys; print(sum(json.load(open(f)).get("opened", 0) for f in sys.argv[1:]))' "$out"/client-*.json)
errors=$(python3 -c 'import json,sys; print(sum(json.load(open(f)).get("errors", 0) for f in sys.argv[1:]))' "$out"/client-*.json)

{
    echo "requested: $total over $procs server processes (switchboard echo --reuse-port, core 0) and $procs clients (core 1)"
    echo "opened by the clients: $opened (errors: $errors)"
    echo "most held at once (established server sockets): $best"
    echo "descriptors per server process at that moment: $per_process"
    echo "servers' RSS: $before KiB before, $best_rss KiB with $best connections"
    python3 -c "print(f'growth per connection: {($best_rss - $before) / max($best, 1):.2f} KiB')"
    echo "command: benches/c100k.sh $total $procs $hold; $(date -u +%FT%TZ); $(uname -sr)"
} | tee "$out/summary.txt"
