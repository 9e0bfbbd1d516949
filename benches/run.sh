#!/usr/bin/env bash
# The performance matrix: switchboard beside its peers, measured in one run on this machine.
#
#   benches/run.sh [echo] [idle] [fanout]      (default: all three; BENCH_SECONDS=5 BENCH_RUNS=3)
#
# Every server runs pinned to core 0 and the load generator (`switchboard bench`) to core 1, each on
# the runtime flavour its own example uses (fastwebsockets: current-thread; tokio-tungstenite:
# multi-threaded; Node and Python: one event loop), and switchboard on both flavours (`--threads 1`
# is a current-thread runtime), so each ratio compares like with like. Each
# cell runs BENCH_RUNS times, the servers interleaved within each round, and the tables report
# medians and switchboard's ratio to each peer. Results: target/bench-matrix/*.json and
# target/bench-matrix/report.md; each part's tables also replace that part's marked region of
# BENCHMARKS.md (between `<!-- benches/run.sh PART: begin -->` and `... end -->`), headed by the
# command, date, commit and machine, so a partial run rewrites only its own tables.
#
# Peers: echo servers on tokio-tungstenite and fastwebsockets (benches/peers, from crates.io), Node's
# `ws` (npm); for fan-out, the seeds' own chat servers, run as the seeds wrote them: seed 000's FastAPI
# app under uvicorn (PyPI) and seed 004's Node `ws` broadcast server (port 8080, as printed). Their
# code is read from ../shared/seeds at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
root=$PWD
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(echo idle fanout)
seconds=${BENCH_SECONDS:-5}
runs=${BENCH_RUNS:-3}
out=$root/target/bench-matrix
mkdir -p "$out"
rm -f "$out"/*.json
ulimit -n "$(ulimit -Hn)"

echo "building" >&2
cargo build --release --locked -p switchboard >&2
cargo build --release --locked --manifest-path benches/peers/Cargo.toml >&2
(cd benches/peers && npm ci --no-audit --no-fund --loglevel=error >&2)
sb=$root/target/release/switchboard
peers=$root/benches/peers/target/release


# start_server NAME PORT: starts NAME pinned to core 0 and sets $server_pid.
start_server() {
    local name=$1 port=$2
    case $name in
        switchboard) taskset -c 0 "$sb" echo --listen "127.0.0.1:$port" --no-compression 2>/dev/null & ;;
        switchboard-1t) taskset -c 0 "$sb" echo --threads 1 --listen "127.0.0.1:$port" --no-compression 2>/dev/null & ;;
        tokio-tungstenite) taskset -c 0 "$peers/tungstenite_echo" "127.0.0.1:$port" & ;;
        fastwebsockets) taskset -c 0 "$peers/fastwebsockets_echo" "127.0.0.1:$port" & ;;
        node-ws) taskset -c 0 node benches/peers/ws_echo.js "127.0.0.1:$port" & ;;
        switchboard-serve|switchboard-serve-1t)
            threads=0; [ "$name" = switchboard-serve-1t ] && threads=1
            SWITCHBOARD_LOG=warn taskset -c 0 "$sb" serve --threads "$threads" --listen "127.0.0.1:$port" --db "$out/serve-$port.db" \
                --rate-limit 0 --keepalive-secs 0 --compression false & ;;
        seed-fastapi)
            (cd "$out/seed000" && PYTHONPATH="$out/python" exec taskset -c 0 python3 -m uvicorn main:app \
                --host 127.0.0.1 --port "$port" --log-level warning) & ;;
        seed-node) (cd "$out/seed004" && NODE_PATH="$root/benches/peers/node_modules" exec taskset -c 0 node server.js) & ;;
        *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    server_pid=$!
    wait_port "$port" || { echo "$name did not start on $port" >&2; exit 1; }
}
stop_server() { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -f "$out"/serve-*.db*; }
load() { taskset -c 1 "$sb" bench "$@" --json 2>/dev/null; }

machine() {
    echo "- Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -sr)"
    echo "- $(rustc --version); node $(node --version); $(python3 --version)"
    echo "- Peers: $(awk '/^name = "(fastwebsockets|tokio-tungstenite|tungstenite)"$/ { n = $3; getline; printf "%s %s, ", n, $3 }' benches/peers/Cargo.lock | tr -d '"')ws $(node -p 'require("./benches/peers/node_modules/ws/package.json").version')"
    echo "- Every server pinned by taskset to core 0 (a multi-threaded tokio runtime there has one worker), the load on core 1; each table names each server's runtime flavour"
}

if [[ " ${parts[*]} " == *" echo "* ]]; then
    servers=(switchboard switchboard-1t fastwebsockets tokio-tungstenite node-ws)
    cells=("100 20" "10 16384" "200 16384" "1000 20")
    # What the kernel alone charges core 0 per message: most of every server's time per message.
    taskset -c 0 "$peers/loopback_floor" 26 16392 >"$out/loopback.jsonl"
    for run in $(seq "$runs"); do
        for cell in "${cells[@]}"; do
            read -r c s <<<"$cell"
            for name in "${servers[@]}"; do
                port=$(free_port)
                start_server "$name" "$port"
                echo "echo run $run: $name ${c}x${s}B" >&2
                load echo "ws://127.0.0.1:$port/" -c "$c" -s "$s" -d "$seconds" --warmup 1 --server-pid "$server_pid" >"$out/echo-$name-${c}x$s-$run.json" || echo '{}' >"$out/echo-$name-${c}x$s-$run.json"
                stop_server
            done
        done
    done
fi

if [[ " ${parts[*]} " == *" idle "* ]]; then
    sources=$(seq -s, -f '127.0.0.%g' 2 9)
    for name in switchboard switchboard-1t switchboard-serve fastwebsockets tokio-tungstenite node-ws; do
        port=$(free_port)
        start_server "$name" "$port"
        sleep 0.5
        echo "idle: $name 10000 connections" >&2
        load idle "ws://127.0.0.1:$port/ws" -c 10000 --hold 5 --source-ips "$sources" --server-pid "$server_pid" >"$out/idle-$name.json" || true
        stop_server
    done
fi

if [[ " ${parts[*]} " == *" fanout "* ]]; then
    # The seeds' programs, extracted from the seed documents as printed.
    python3 - "$out" <<'EOF'
import glob, os, re, sys
out = sys.argv[1]
seed000 = open(glob.glob("../shared/seeds/000_*")[0]).read()
py = seed000[seed000.index("from fastapi import"):]
py = py[: py.index("app.clients.remove(websocket)")] + "app.clients.remove(websocket) # when disconnected, remove the client from the list\n"
seed004 = open(glob.glob("../shared/seeds/004_*")[0]).read()
js = seed004[seed004.index("const WebSocket = require('ws');"):]
js = js[: js.index("\n});\n", js.index("ws.on('close'")) + 5]
for folder, name, text in [("seed000", "main.py", py), ("seed004", "server.js", js)]:
    os.makedirs(f"{out}/{folder}", exist_ok=True)
    open(f"{out}/{folder}/{name}", "w").write(text)
EOF
    python3 -m pip install --quiet --disable-pip-version-check --target "$out/python" fastapi uvicorn websockets >&2
    subscribers=${FANOUT_SUBSCRIBERS:-1000}
    rates=${FANOUT_RATES:-"100 1000 2000"}
    for run in $(seq "$runs"); do
        for rate in $rates; do
            for name in switchboard-serve switchboard-serve-1t seed-node seed-fastapi; do
                if [ "$name" = seed-node ]; then port=8080; else port=$(free_port); fi
                start_server "$name" "$port"
                echo "fanout run $run: $name 1 -> $subscribers at $rate/s" >&2
                load fanout "ws://127.0.0.1:$port/ws" --subscribers "$subscribers" --rate "$rate" -d "$seconds" \
                    --server-pid "$server_pid" >"$out/fanout-$name-$rate-$run.json" || echo '{}' >"$out/fanout-$name-$rate-$run.json"
                stop_server
            done
        done
    done
fi

commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo "+changes")
header="Command: \`benches/run.sh ${parts[*]}\` (BENCH_SECONDS=$seconds, BENCH_RUNS=$runs"
[[ " ${parts[*]} " == *" fanout "* ]] && header+=", FANOUT_RATES=\"${rates}\""
header+="), $(date -u +%Y-%m-%d), commit $commit"
header+=$'\n\n'"$(machine)"
HEADER="$header" python3 - "$out" "$root/BENCHMARKS.md" <<'EOF' | tee "$out/report.md"
import glob, json, os, re, statistics, sys
out, benchmarks = sys.argv[1], sys.argv[2]
sections = {}
def section(part):
    lines = []
    sections[part] = lines
    return lambda *text: lines.append(" ".join(str(t) for t in text))
def load(pattern):
    rows = []
    for path in sorted(glob.glob(os.path.join(out, pattern))):
        try:
            rows.append(json.load(open(path)))
        except ValueError:
            pass
    return rows
# Each server's runtime flavour: a stated column of every table.
FLAVOUR = {
    "switchboard": "tokio multi-thread", "switchboard-1t": "tokio current-thread (`--threads 1`)",
    "switchboard-serve": "tokio multi-thread", "switchboard-serve-1t": "tokio current-thread (`--threads 1`)",
    "fastwebsockets": "tokio current-thread (its example)", "tokio-tungstenite": "tokio multi-thread (its example)",
    "node-ws": "Node event loop", "seed-node": "Node event loop", "seed-fastapi": "Python asyncio (uvicorn)",
}
def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None

echo_files = glob.glob(os.path.join(out, "echo-*.json"))
if echo_files:
    emit = section("echo")
    servers = ["switchboard", "switchboard-1t", "fastwebsockets", "tokio-tungstenite", "node-ws"]
    cells = ["100x20", "10x16384", "200x16384", "1000x20"]
    # Like with like: each peer beside switchboard on the same flavour.
    pairs = [("switchboard-1t", "fastwebsockets"), ("switchboard", "tokio-tungstenite"), ("switchboard-1t", "node-ws")]
    emit("\n### Echo (closed loop, msgs/s, median of runs; p99 round trip)\n")
    emit("| connections x size | " + " | ".join(servers) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    emit("|---" * (len(servers) + len(pairs) + 1) + "|")
    emit("| runtime | " + " | ".join(FLAVOUR[s] for s in servers) + " |" + " |" * len(pairs))
    for cell in cells:
        rates, cols = {}, []
        for s in servers:
            rows = load(f"echo-{s}-{cell}-*.json")
            rate, p99 = median(rows, "msgs_per_s"), median(rows, "p99_us")
            rates[s] = rate
            cols.append("n/a" if rate is None else f"{rate:,.0f} (p99 {p99 / 1000:.2f} ms)")
        ratio = lambda a, b: "n/a" if not rates.get(a) or not rates.get(b) else f"{rates[a] / rates[b]:.2f}"
        c, s = cell.split("x")
        emit(f"| {c} x {int(s):,} B | " + " | ".join(cols) + " | " + " | ".join(ratio(a, b) for a, b in pairs) + " |")
    floor_path = os.path.join(out, "loopback.jsonl")
    if os.path.exists(floor_path):
        floors = [json.loads(line) for line in open(floor_path) if line.strip()]
        costs = "; ".join(f"{f['ns_per_message'] / 1000:.1f} µs for {f['bytes']:,} bytes (1 / that = {f['messages_per_s']:,.0f}/s)" for f in floors)
        emit(f"\nThe kernel alone (`loopback_floor` on core 0: one write and one read over loopback TCP, no WebSocket code): {costs}. "
              "An echoed message costs the server's core one read and one write, so this is most of its time per message (1 / msgs/s).")
    emit("\n### Where the time goes in the echo cells (share of one core over the measured seconds, medians)\n")
    emit("Each cell: server busy (of which user time: its own code and libraries) / load generator busy (user time).")
    emit("The rest is kernel time, and a server whose own code cost nothing would still pay it: at best, it would beat a")
    emit("saturated peer by the peer's busy / (busy - user).\n")
    emit("| connections x size | " + " | ".join(servers) + " |")
    emit("|---" * (len(servers) + 1) + "|")
    emit("| runtime | " + " | ".join(FLAVOUR[s] for s in servers) + " |")
    def share(rows, side, key):
        values = [r[side][key] for r in rows if isinstance(r.get(side), dict)]
        return statistics.median(values) if values else None
    for cell in cells:
        cols = []
        for s in servers:
            rows = load(f"echo-{s}-{cell}-*.json")
            busy, user = share(rows, "server_cpu", "busy"), share(rows, "server_cpu", "user")
            client, client_user = share(rows, "client_cpu", "busy"), share(rows, "client_cpu", "user")
            cols.append("n/a" if busy is None or client is None else f"{busy:.0%} ({user:.0%} user) / {client:.0%} ({client_user:.0%} user)")
        c, size = cell.split("x")
        emit(f"| {c} x {int(size):,} B | " + " | ".join(cols) + " |")

idle_files = glob.glob(os.path.join(out, "idle-*.json"))
if idle_files:
    emit = section("idle")
    emit("\n### Idle connections (10,000 held; server RSS growth per connection)\n")
    emit("| server | runtime | opened | KiB per connection |")
    emit("|---|---|---|---|")
    for s in ["switchboard", "switchboard-1t", "switchboard-serve", "fastwebsockets", "tokio-tungstenite", "node-ws"]:
        rows = load(f"idle-{s}.json")
        if rows:
            r = rows[0]
            kib = r.get("server_kib_per_connection")
            emit(f"| {s} | {FLAVOUR[s]} | {r.get('opened')} | {'n/a' if kib is None else f'{kib:.1f}'} |")

fan_files = glob.glob(os.path.join(out, "fanout-*.json"))
if fan_files:
    emit = section("fanout")
    subscribers = sorted({r.get("subscribers") for r in load("fanout-*.json") if r.get("subscribers")})
    emit(f"\n### Chat fan-out (1 publisher -> {', '.join(f'{n:,}' for n in subscribers) or 'N'} subscribers, seed protocol; medians)\n")
    emit("| server | runtime | rate/s | deliveries/s | p50 | p99 | lost | server CPU per delivery |")
    emit("|---|---|---|---|---|---|---|---|")
    rates = sorted({int(os.path.basename(p).split("-")[-2]) for p in fan_files})
    for rate in rates:
        for s in ["switchboard-serve", "switchboard-serve-1t", "seed-node", "seed-fastapi"]:
            rows = load(f"fanout-{s}-{rate}-*.json")
            d = median(rows, "deliveries_per_s")
            if d is None:
                emit(f"| {s} | {FLAVOUR[s]} | {rate} | n/a | | | | |")
                continue
            cpu = median(rows, "server_cpu_us_per_delivery")
            cpu = "n/a" if cpu is None else f"{cpu:.2f} µs"
            emit(f"| {s} | {FLAVOUR[s]} | {rate} | {d:,.0f} | {median(rows, 'p50_us') / 1000:.1f} ms | {median(rows, 'p99_us') / 1000:.1f} ms | {median(rows, 'lost'):,.0f} | {cpu} |")

header = os.environ["HEADER"]
print(header)
for lines in sections.values():
    print("\n".join(lines))
# Each part's tables replace that part's region of BENCHMARKS.md; the text around them stays.
text = open(benchmarks).read()
for part, lines in sections.items():
    begin, end = f"<!-- benches/run.sh {part}: begin -->", f"<!-- benches/run.sh {part}: end -->"
    if begin not in text or end not in text:
        print(f"BENCHMARKS.md has no region for {part}: its tables are only in report.md", file=sys.stderr)
        continue
    start, stop = text.index(begin) + len(begin), text.index(end)
    text = text[:start] + "\n" + header + "\n" + "\n".join(lines) + "\n\n" + text[stop:]
open(benchmarks, "w").write(text)
EOF

