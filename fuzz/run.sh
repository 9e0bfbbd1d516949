#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after another, and prints one line per
# target: executions, corpus size, and whether it crashed. Usage: fuzz/run.sh [SECONDS] [TARGET...]
#
# cargo-fuzz needs nightly-only flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the stable toolchain take
# them, as this machine has no nightly. Seeds in fuzz/seeds/ are read; the growing corpus goes to the
# ignored fuzz/corpus/ and crashes to fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_header handshake inflate engine_split)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O >/dev/null
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    log="corpus/$target.log"
    if cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
        result=ok
    else
        result="CRASHED (see $log and artifacts/$target/)"
        status=1
    fi
    runs=$(grep -Eo '^Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' || echo "?")
    corpus=$(find "corpus/$target" -type f | wc -l)
    echo "$target: ${seconds}s, $runs executions, corpus $corpus inputs, $result"
done
exit $status
