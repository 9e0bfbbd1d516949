#!/usr/bin/env bash
# The server API against its own OpenAPI document (/api/openapi.json): schemathesis from PyPI with
# every check, for MAX_TIME seconds (default 60): no 5xx, every answer in its schema, bad input
# refused, valid input taken. Installs schemathesis into target/schemathesis-venv when missing.
#
#   scripts/schemathesis.sh            (SWITCHBOARD_BIN=target/debug/switchboard MAX_TIME=60)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv" && python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==4.32.5"
fi
bin=${SWITCHBOARD_BIN:-target/debug/switchboard}
dir=$(mktemp -d)
key=schemathesis-key
SWITCHBOARD_LOG=info "$bin" serve --listen 127.0.0.1:0 --db "$dir/chat.db" --api-key "$key" 2>"$dir/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
addr=
for _ in $(seq 100); do
  addr=$(grep -o 'serving http://[0-9.:]*' "$dir/serve.log" | head -1 | sed 's|serving http://||' || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "serve did not start:"; cat "$dir/serve.log"; exit 1; }
"$venv/bin/st" run "http://$addr/api/openapi.json" -H "Authorization: Bearer $key" --checks all \
  --max-time "${MAX_TIME:-60}"
