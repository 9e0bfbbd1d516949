#!/usr/bin/env bash
# Runs the Autobahn TestSuite (../shared/autobahn/run.sh) against switchboard in both roles:
#   server side: `switchboard echo` attacked by wstest's fuzzing client
#   client side: examples/autobahn_client.rs driving wstest's fuzzing server
# Usage: scripts/autobahn.sh [server|client|both]   (extra AB_* variables pass through to run.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SWITCHBOARD_SHARED:-$ROOT/../shared}
RUN="$SHARED/autobahn/run.sh"
[ -f "$RUN" ] || { echo "autobahn.sh: $RUN not found (set SWITCHBOARD_SHARED)" >&2; exit 2; }

cargo build --release --locked -p switchboard --bin switchboard -p switchboard-examples --example autobahn_client
export AB_SERVER_CMD="$ROOT/target/release/switchboard echo --listen 127.0.0.1:9002"
export AB_CLIENT_CMD="$ROOT/target/release/examples/autobahn_client \"\$AB_FUZZ_URL\" \"\$AB_AGENT\""
export AB_OUT=${AB_OUT:-$ROOT/autobahn-reports}
exec bash "$RUN" "${1:-both}"
