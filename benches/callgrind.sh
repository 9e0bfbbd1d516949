#!/usr/bin/env bash
# Instructions counted by callgrind: what a user pays per echoed message, per connection, and per
# chat delivery. Counts are repeatable on a noisy machine: they are instructions, not time.
#
#   benches/callgrind.sh [report]   every measurement, switchboard beside the peers (Markdown)
#   (CALLGRIND_SERVERS="switchboard fastwebsockets" limits the echo table to those servers)
#   benches/callgrind.sh guard      switchboard's echo 20 B, echo 16 KiB and serve fan-out per
#                                   delivery, on the current-thread runtime, against
#                                   benches/baseline.json: fails if one grew more than 5% (the CI
#                                   performance guard; under a minute, once built)
#
# Each count runs the server under `valgrind --tool=callgrind` twice, with a LOW and a HIGH amount
# of work, and divides the difference of the two totals by the difference in work: startup,
# handshakes and shutdown cancel out. Servers:
#   switchboard     `switchboard echo`, tokio multi-threaded runtime (the default)
#   switchboard-1t  `switchboard echo --threads 1`, tokio current-thread runtime
#   fastwebsockets  its examples/echo_server.rs (current-thread runtime, unconstrained task)
#   tokio-tungstenite  its examples/echo-server.rs (multi-threaded runtime)
# (benches/peers; each file lists its differences from the example.) Fan-out: `switchboard serve`
# (both flavours), 1 publisher and 100 `switchboard.v1` subscribers in a closed loop (each message
# sent once every subscriber has the one before).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
mode=${1:-report}
out=target/callgrind
mkdir -p "$out"
cargo build --release --locked -p switchboard >&2
sb=target/release/switchboard
peers=benches/peers/target/release
if [ "$mode" = report ]; then
    cargo build --release --locked --manifest-path benches/peers/Cargo.toml >&2
fi

# start NAME PORT: the server NAME under callgrind, its output in $file; sets $pid.
start() {
    local name=$1 port=$2 cmd
    case $name in
        switchboard) cmd=("$sb" echo --listen "127.0.0.1:$port" --no-compression) ;;
        switchboard-1t) cmd=("$sb" echo --threads 1 --listen "127.0.0.1:$port" --no-compression) ;;
        fastwebsockets) cmd=("$peers/fastwebsockets_echo" "127.0.0.1:$port") ;;
        tokio-tungstenite) cmd=("$peers/tungstenite_echo" "127.0.0.1:$port") ;;
        serve|serve-1t)
            local threads=0 db
            [ "$name" = serve-1t ] && threads=1
            db=$(mktemp -d)/chat.db
            cmd=("$sb" serve --threads "$threads" --listen "127.0.0.1:$port" --db "$db" --rate-limit 0
                --keepalive-secs 0 --compression false) ;;
        *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    SWITCHBOARD_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$file" "${cmd[@]}" 2>/dev/null &
    pid=$!
    wait_port "$port" 120 || { echo "$name did not start" >&2; exit 1; }
}

# total NAME LOAD...: the server's instructions over a run of `switchboard bench LOAD...` against
# it (URL inserted as the bench's first argument); the bench's JSON is left in $out/last.json.
total() {
    local name=$1 port path
    shift
    port=$(free_port)
    file=$out/$name-$RANDOM.out
    start "$name" "$port"
    path=/
    case $name in serve*) path=/ws ;; esac
    "$sb" bench "$1" "ws://127.0.0.1:$port$path" "${@:2}" --json >"$out/last.json" 2>/dev/null
    sleep 0.5
    kill -INT "$pid"
    wait "$pid" 2>/dev/null || true
    callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
    rm -f "$file"
}

# per_message NAME SIZE LOW HIGH [--binary]: instructions per echoed message (10 connections).
per_message() {
    local name=$1 size=$2 low=$3 high=$4 a b
    a=$(total "$name" echo -c 10 -s "$size" --count "$low" ${5:-})
    b=$(total "$name" echo -c 10 -s "$size" --count "$high" ${5:-})
    echo $(( (b - a) / (high - low) ))
}

# per_connection NAME LOW HIGH: instructions per connection that opens (handshake), echoes one
# 20-byte message and closes.
per_connection() {
    local name=$1 low=$2 high=$3 a b
    a=$(total "$name" echo -c "$low" -s 20 --count "$low")
    b=$(total "$name" echo -c "$high" -s 20 --count "$high")
    echo $(( (b - a) / (high - low) ))
}

# per_delivery NAME LOW HIGH: instructions per delivered chat message, 1 publisher -> 100 subscribers.
per_delivery() {
    local name=$1 low=$2 high=$3 a b da db
    a=$(total "$name" fanout --protocol v1 --subscribers 100 --count "$low")
    da=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delivered"])' "$out/last.json")
    b=$(total "$name" fanout --protocol v1 --subscribers 100 --count "$high")
    db=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delivered"])' "$out/last.json")
    echo $(( (b - a) / (db - da) ))
}

if [ "$mode" = guard ]; then
    declare -A got
    # The current-thread flavours: with one thread nothing depends on which worker ran a task or
    # when another one parked, so a count depends on the code alone (within about 1%, also with
    # the other core busy). The multi-threaded counts moved by up to 6% between machines and runs
    # with no change in the code, more than the guard's margin.
    got[echo_20]=$(per_message switchboard-1t 20 2000 12000)
    got[echo_16k]=$(per_message switchboard-1t 16384 300 1800 --binary)
    got[fanout_delivery]=$(per_delivery serve-1t 20 220)
    python3 - benches/baseline.json "${got[echo_20]}" "${got[echo_16k]}" "${got[fanout_delivery]}" <<'EOF'
import json, sys
baseline = json.load(open(sys.argv[1]))["instructions"]
got = dict(zip(["echo_20", "echo_16k", "fanout_delivery"], map(int, sys.argv[2:])))
failed = []
print("| measurement | baseline | now | change |")
print("|---|---|---|---|")
for key, now in got.items():
    base = baseline[key]
    change = now / base - 1
    print(f"| {key} | {base:,} | {now:,} | {change:+.1%} |")
    if change > 0.05:
        failed.append(key)
if failed:
    print(f"\nslower than benches/baseline.json by more than 5%: {', '.join(failed)}. If that is the price of a")
    print("change you mean, say why in the commit that updates the baseline.")
    sys.exit(1)
EOF
    exit
fi

echo "### Echo: instructions per message (10 connections; 2,000 vs 12,000 messages, 16 KiB: 500 vs 3,000)"
echo
echo "| server | runtime | 20 B text | 16 KiB text | 16 KiB binary | per connection (handshake, one message, close) |"
echo "|---|---|---|---|---|---|"
declare -A flavour=(
    [switchboard]="tokio multi-thread" [switchboard-1t]="tokio current-thread (\`--threads 1\`)"
    [fastwebsockets]="tokio current-thread, unconstrained (its example)" [tokio-tungstenite]="tokio multi-thread (its example)"
    [serve]="tokio multi-thread" [serve-1t]="tokio current-thread (\`--threads 1\`)"
)
declare -A small big bigbin conn
for name in ${CALLGRIND_SERVERS:-switchboard switchboard-1t fastwebsockets tokio-tungstenite}; do
    small[$name]=$(per_message "$name" 20 2000 12000)
    big[$name]=$(per_message "$name" 16384 500 3000)
    bigbin[$name]=$(per_message "$name" 16384 500 3000 --binary)
    conn[$name]=$(per_connection "$name" 50 250)
    echo "| $name | ${flavour[$name]} | ${small[$name]} | ${big[$name]} | ${bigbin[$name]} | ${conn[$name]} |"
done
echo
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
if [ -n "${small[fastwebsockets]:-}" ] && [ -n "${small[switchboard-1t]:-}" ]; then
    echo "Same flavour, switchboard / fastwebsockets (current-thread): 20 B $(ratio "${small[switchboard-1t]}" "${small[fastwebsockets]}")," \
        "16 KiB text $(ratio "${big[switchboard-1t]}" "${big[fastwebsockets]}"), 16 KiB binary $(ratio "${bigbin[switchboard-1t]}" "${bigbin[fastwebsockets]}")," \
        "per connection $(ratio "${conn[switchboard-1t]}" "${conn[fastwebsockets]}")."
fi
if [ -n "${small[tokio-tungstenite]:-}" ] && [ -n "${small[switchboard]:-}" ]; then
    echo "Same flavour, switchboard / tokio-tungstenite (multi-thread): 20 B $(ratio "${small[switchboard]}" "${small[tokio-tungstenite]}")," \
        "16 KiB binary $(ratio "${bigbin[switchboard]}" "${bigbin[tokio-tungstenite]}")."
fi
echo
echo "### Chat fan-out: instructions per delivery (\`serve\`, 1 publisher -> 100 subscribers, 20 vs 120 messages)"
echo
echo "| server | runtime | per delivery |"
echo "|---|---|---|"
for name in serve serve-1t; do
    echo "| switchboard $name | ${flavour[$name]} | $(per_delivery "$name" 20 120) |"
done
echo
echo "Command: \`benches/callgrind.sh\`, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD)"
