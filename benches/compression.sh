#!/usr/bin/env bash
# permessage-deflate measurements for BENCHMARKS.md: `switchboard echo` pinned to core 0, the load
# (examples/deflate_bench.rs) on core 1. Ratios within one run are what matter on a shared machine.
# Usage: benches/compression.sh [SECONDS] [CONNECTIONS] [IDLE_CONNECTIONS]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_PER_RUN=${1:-10}; CONNECTIONS=${2:-10}; IDLE=${3:-1000}
cd "$ROOT"
cargo build --release --locked -q -p switchboard --bin switchboard -p switchboard-examples --example deflate_bench
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SERVER=
stop() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null; SERVER=; }
trap stop EXIT
start() { # echo flags...
  stop || true
  taskset -c 0 target/release/switchboard echo --listen "127.0.0.1:$PORT" "$@" 2>/dev/null &
  SERVER=$!
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.1; done
  echo "server did not start" >&2; exit 2
}
BENCH=(taskset -c 1 target/release/examples/deflate_bench)
echo "# $(date -u +%FT%TZ) $(nproc) cores; rustc $(rustc --version | cut -d' ' -f2); server on core 0, load on core 1"
start
"${BENCH[@]}" throughput "ws://127.0.0.1:$PORT/" "$SECONDS_PER_RUN" "$CONNECTIONS"
# Idle RSS, each on a fresh server so earlier runs do not blur the baseline.
echo "# idle, no compression:";                  start; "${BENCH[@]}" idle "ws://127.0.0.1:$PORT/" "$IDLE" "$SERVER" plain
echo "# idle, deflate defaults (w=15, m=8):";    start; "${BENCH[@]}" idle "ws://127.0.0.1:$PORT/" "$IDLE" "$SERVER"
echo "# idle, deflate --deflate-window-bits 10 --deflate-mem-level 1:"
start --deflate-window-bits 10 --deflate-mem-level 1; "${BENCH[@]}" idle "ws://127.0.0.1:$PORT/" "$IDLE" "$SERVER"
