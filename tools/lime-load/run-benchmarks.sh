#!/usr/bin/env bash
# The getPeerBundle benchmark of docs/benchmarks.md, end to end, for one store size:
# raw claim rate (synchronous full and normal), then the server over loopback at
# each connection count and synchronous mode, each run REPEAT times on a fresh copy
# of the same seeded database. Prints every run's figures, then one summary line
# per configuration with the median.
#
# Usage (from the workspace root, after `cargo build --release -p lime-server -p lime-load`):
#   tools/lime-load/run-benchmarks.sh [WORK_DIR]
# Settings (environment): DEVICES (1000), OPKS (1000 OPks per device), REQUESTS (20000 per
# server run), RAW_REQUESTS (20000), REPEAT (3), CONNECTIONS ("1 16"), SYNC ("full normal"),
# PORT (25600), SCHEME (https; "http" runs the server with --plain-http), PARTS ("raw server":
# which halves to run), BIN (target/release: where lime-server and lime-load are).
set -euo pipefail

BIN=${BIN:-target/release}
WORK=${1:-/tmp/lime-bench}
DEVICES=${DEVICES:-1000}
OPKS=${OPKS:-1000}
REQUESTS=${REQUESTS:-20000}
RAW_REQUESTS=${RAW_REQUESTS:-20000}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-1 16}
SYNC=${SYNC:-full normal}
PORT=${PORT:-25600}
SCHEME=${SCHEME:-https}
PARTS=${PARTS:-raw server}

for tool in lime-server lime-load; do
    [[ -x $BIN/$tool ]] || { echo "$BIN/$tool missing: cargo build --release -p lime-server -p lime-load" >&2; exit 1; }
done

template=$WORK/template-$DEVICES-$OPKS
run=$WORK/run
mkdir -p "$WORK"
if [[ ! -f $template/lime-c25519.sqlite3 ]]; then
    rm -rf "$template"
    "$BIN/lime-load" seed --data-dir "$template" --curve c25519 --devices "$DEVICES" --opks-per-device "$OPKS"
fi

# A fresh copy of the seeded store, so every run starts from the same data; flushed
# to disk first, or the run's first fsync would pay for writing the whole copy.
fresh_copy() {
    rm -rf "$run"
    mkdir -p "$run"
    cp "$template/lime-c25519.sqlite3" "$run/"
    sync "$run/lime-c25519.sqlite3"
}

# CPU seconds other processes used during a run (noise indicator), from lime-load's output.
other_cpu() { sed -nE 's/.*other processes ([0-9.]+) s CPU.*/\1/p'; }

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

server_pid=
stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap stop_server EXIT

summary=()
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%FT%TZ)"

[[ " $PARTS " == *" raw "* ]] && for sync in $SYNC; do
    rates=()
    others=()
    for ((i = 1; i <= REPEAT; i++)); do
        fresh_copy
        out=$("$BIN/lime-load" raw-claims --data-dir "$run" --curve c25519 --devices "$DEVICES" \
            --requests "$RAW_REQUESTS" --synchronous "$sync")
        echo "$out"
        rates+=("$(awk '/rate:/ { print $2 }' <<<"$out")")
        others+=("$(other_cpu <<<"$out")")
    done
    summary+=("raw $sync devices=$DEVICES: median $(printf '%s\n' "${rates[@]}" | median) claims/s (runs: ${rates[*]}; other processes' CPU s: ${others[*]})")
done

[[ " $PARTS " == *" server "* ]] && for sync in $SYNC; do
    for conns in $CONNECTIONS; do
        rates=()
        cpus=()
        others=()
        for ((i = 1; i <= REPEAT; i++)); do
            fresh_copy
            cat >"$run/lime-server.toml" <<EOF
[storage]
data_dir = "$run"
curves = ["c25519"]
sqlite_synchronous = "$sync"
[log]
level = "warn"
EOF
            plain=()
            [[ $SCHEME == http ]] && plain=(--plain-http)
            "$BIN/lime-server" --config "$run/lime-server.toml" serve --listen "127.0.0.1:$PORT" "${plain[@]}" \
                2>>"$WORK/server.log" &
            server_pid=$!
            for _ in $(seq 100); do
                curl -skf "$SCHEME://127.0.0.1:$PORT/health" >/dev/null && break
                sleep 0.1
            done
            ca=()
            [[ $SCHEME == https ]] && ca=(--ca "$run/tls/self-signed.crt")
            out=$("$BIN/lime-load" bundles --url "$SCHEME://127.0.0.1:$PORT/" "${ca[@]}" \
                --curve c25519 --devices "$DEVICES" --connections "$conns" --requests "$REQUESTS" \
                --server-pid "$server_pid")
            stop_server
            echo "$out"
            rates+=("$(awk '/rate:/ { print $2 }' <<<"$out")")
            cpus+=("$(awk '/server CPU:/ { print $3 }' <<<"$out")")
            others+=("$(other_cpu <<<"$out")")
        done
        summary+=("server $SCHEME $sync devices=$DEVICES connections=$conns: median $(printf '%s\n' "${rates[@]}" | median) requests/s (runs: ${rates[*]}), server CPU median $(printf '%s\n' "${cpus[@]}" | median) ms/request (runs: ${cpus[*]}; other processes' CPU s: ${others[*]})")
    done
done

echo
printf '%s\n' "${summary[@]}"
