#!/usr/bin/env bash
# The getPeerBundle benchmark of docs/benchmarks.md, end to end, for one store size:
# the raw claim rate (lime-load raw-claims) for each synchronous mode, then the server
# over loopback for each synchronous mode and connection count, each run REPEAT times
# on a fresh copy of the same seeded database. Prints every run's report, then one
# summary line per configuration with the median.
#
# Usage (from the workspace root, after `cargo build --release -p lime-server -p lime-load`):
#   tools/lime-load/run-benchmarks.sh [WORK_DIR]        (default /tmp/lime-bench)
#
# Settings (environment variables, default in parentheses):
#   DEVICES (1000), OPKS (1000: OPks per device), REQUESTS (20000 per server run),
#   RAW_REQUESTS (20000 per raw run), REPEAT (3), CONNECTIONS ("1 16"), SYNC ("full normal"),
#   PARTS ("raw server": which halves to run), SCHEME (https; http runs the server with
#   --plain-http), PORT (25600), BIN (target/release: where lime-server and lime-load are),
#   MAX_OTHERS (0.5: a run during which other processes used more CPU seconds than this is
#   done again, at most 5 times; a run kept anyway is marked with * in the summary),
#   METRICS (off; on: the server runs with [metrics] listen on port PORT+1, scraped
#   never: the cost of counting).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

BIN=${BIN:-target/release}
WORK=${1:-/tmp/lime-bench}
DEVICES=${DEVICES:-1000}
OPKS=${OPKS:-1000}
REQUESTS=${REQUESTS:-20000}
RAW_REQUESTS=${RAW_REQUESTS:-20000}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-1 16}
SYNC=${SYNC:-full normal}
PARTS=${PARTS:-raw server}
SCHEME=${SCHEME:-https}
PORT=${PORT:-25600}
export MAX_OTHERS=${MAX_OTHERS:-0.5}
METRICS=${METRICS:-off}

require_tools "$BIN" lime-server lime-load

template=$WORK/template-$DEVICES-$OPKS
run=$WORK/run
mkdir -p "$WORK"
seed_template "$BIN/lime-load" "$template" c25519 "$DEVICES" "$OPKS"
trap stop_server EXIT

# One raw-claims run on a fresh copy; prints lime-load's report.
raw_run() {
    local sync=$1
    echo "== raw synchronous=$sync devices=$DEVICES"
    fresh_copy "$template" "$run"
    "$BIN/lime-load" raw-claims --data-dir "$run" --curve c25519 --devices "$DEVICES" \
        --requests "$RAW_REQUESTS" --synchronous "$sync"
}

# One server run on a fresh copy: start the server, load it, stop it; prints
# lime-load's report.
server_run() {
    local sync=$1 conns=$2 ca=()
    echo "== server $SCHEME synchronous=$sync devices=$DEVICES connections=$conns metrics=$METRICS"
    fresh_copy "$template" "$run"
    printf '[storage]\ndata_dir = "%s"\ncurves = ["c25519"]\nsqlite_synchronous = "%s"\n[limits]\nmax_bundle_requests = 0\n[log]\nlevel = "warn"\n' \
        "$run" "$sync" >"$run/lime-server.toml"
    if [[ $METRICS == on ]]; then
        printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$((PORT + 1))" >>"$run/lime-server.toml"
    fi
    [[ $SCHEME == http ]] || ca=(--ca "$run/tls/self-signed.crt")
    start_server "$BIN/lime-server" "$run/lime-server.toml" "$SCHEME" "$PORT" "$WORK/server.log"
    "$BIN/lime-load" bundles --url "$SCHEME://127.0.0.1:$PORT/" "${ca[@]}" --curve c25519 \
        --devices "$DEVICES" --connections "$conns" --requests "$REQUESTS" \
        --server-pid "$server_pid"
    stop_server
}

summary=()
machine_line

if [[ " $PARTS " == *" raw "* ]]; then
    for sync in $SYNC; do
        rates=() others=()
        for ((i = 1; i <= REPEAT; i++)); do
            measure raw_run "$sync"
            rates+=("$(awk '/rate:/ { print $2 }' <<<"$out")$mark")
            others+=("$(other_cpu <<<"$out")")
        done
        summary+=("raw $sync devices=$DEVICES: median $(printf '%s\n' "${rates[@]}" | median) claims/s (runs: ${rates[*]}; other processes' CPU s: ${others[*]})")
    done
fi

if [[ " $PARTS " == *" server "* ]]; then
    for sync in $SYNC; do
        for conns in $CONNECTIONS; do
            rates=() cpus=() others=()
            for ((i = 1; i <= REPEAT; i++)); do
                measure server_run "$sync" "$conns"
                rates+=("$(awk '/rate:/ { print $2 }' <<<"$out")$mark")
                cpus+=("$(awk '/server CPU:/ { print $3 }' <<<"$out")$mark")
                others+=("$(other_cpu <<<"$out")")
            done
            summary+=("server $SCHEME $sync devices=$DEVICES connections=$conns metrics=$METRICS: median $(printf '%s\n' "${rates[@]}" | median) requests/s (runs: ${rates[*]}), server CPU median $(printf '%s\n' "${cpus[@]}" | median) ms/request (runs: ${cpus[*]}; other processes' CPU s: ${others[*]})")
        done
    done
fi

echo
printf '%s\n' "${summary[@]}"
