#!/usr/bin/env bash
# Instructions per echoed message, counted by callgrind (repeatable on a noisy machine: it counts
# instructions, not time). Each echo server runs under `valgrind --tool=callgrind` twice, echoing
# LOW and then HIGH messages of SIZE bytes over CONNECTIONS connections; the difference of the two
# totals divided by HIGH - LOW is the cost of one more message, with startup and handshakes cancelled
# out.
#
# Usage: benches/callgrind.sh [SIZE=20] [CONNECTIONS=10] [LOW=2000] [HIGH=12000]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
size=${1:-20}
connections=${2:-10}
low=${3:-2000}
high=${4:-12000}
out=target/callgrind
mkdir -p "$out"
cargo build --release --locked -p switchboard >&2
cargo build --release --locked --manifest-path benches/peers/Cargo.toml >&2
sb=target/release/switchboard
peers=benches/peers/target/release


count() { # count NAME MESSAGES: total instructions of the server over a run
    local name=$1 messages=$2 port file pid
    port=$(free_port)
    file=$out/$name-$messages.out
    case $name in
        switchboard) cmd=("$sb" echo --listen "127.0.0.1:$port" --no-compression) ;;
        fastwebsockets) cmd=("$peers/fastwebsockets_echo" "127.0.0.1:$port") ;;
        tokio-tungstenite) cmd=("$peers/tungstenite_echo" "127.0.0.1:$port") ;;
    esac
    SWITCHBOARD_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$file" "${cmd[@]}" 2>/dev/null &
    pid=$!
    wait_port "$port" 60
    "$sb" bench echo "ws://127.0.0.1:$port/" -c "$connections" -s "$size" --count "$messages" --json >/dev/null 2>&1
    sleep 0.5
    kill -INT "$pid"
    wait "$pid" 2>/dev/null || true
    callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}

echo "| server | instructions per ${size}-byte message | ratio to switchboard |"
echo "|---|---|---|"
declare -A per
for name in switchboard fastwebsockets tokio-tungstenite; do
    a=$(count "$name" "$low")
    b=$(count "$name" "$high")
    per[$name]=$(( (b - a) / (high - low) ))
done
for name in switchboard fastwebsockets tokio-tungstenite; do
    ratio=$(python3 -c "print(f'{${per[$name]} / ${per[switchboard]}:.2f}')")
    echo "| $name | ${per[$name]} | $ratio |"
done
echo
echo "Command: \`benches/callgrind.sh $size $connections $low $high\` ($connections connections; $low and $high messages)"
