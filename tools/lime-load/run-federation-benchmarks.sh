#!/usr/bin/env bash
# What federation costs a getPeerBundle: K devices of domain example.org (default
# 10) asked, over loopback HTTPS, C25519, SQLite, bundle request limit off:
# - "local": asked of B, the server of example.org, which holds them;
# - "forwarded": asked of A (domain a.example), which forwards them to B in one
#   request (digest with an HA1, B's nonce reused), on connections it keeps.
# lime-load measures the client's latency and each server's CPU; after each
# forwarded run the script counts A's connections to B and the 401s B answered.
# Prints lime-load's report per run and a summary of medians.
#
# Usage: cargo build --release -p lime-server -p lime-load &&
#        tools/lime-load/run-federation-benchmarks.sh [WORK_DIR]
# Environment: DEVICES (1000), OPKS (1000), PER_REQUEST (10), REQUESTS (10000),
# REPEAT (3), CONNECTIONS ("1 16"), MODES ("local forwarded"), PORT (25800: B;
# A is PORT+1).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

BIN=${BIN:-target/release}
WORK=${1:-/tmp/lime-federation-bench}
DEVICES=${DEVICES:-1000}
OPKS=${OPKS:-1000}
PER_REQUEST=${PER_REQUEST:-10}
REQUESTS=${REQUESTS:-10000}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-1 16}
MODES=${MODES:-local forwarded}
PORT=${PORT:-25800}
B_PORT=$PORT
A_PORT=$((PORT + 1))

mkdir -p "$WORK"
template=$WORK/template-$DEVICES-$OPKS
seed_template "$BIN/lime-load" "$template" c25519 "$DEVICES" "$OPKS"
# The original's digest scheme: user = A's domain, realm = B's domain.
printf '%s' "a.example:example.org:federation-bench" | sha256sum | cut -d' ' -f1 >"$WORK/a-at-b.ha1"
make_nonce_secret "$WORK/nonce.secret"

pids=()
stop_servers() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap stop_servers EXIT

# start_peer NAME PORT [store template]: a server (bench-lib.sh's start_server runs one;
# federation runs two) with the config on stdin
# (appended to the data directory, curve and limit lines), its pid in
# `${NAME}_pid`, its log in $WORK/NAME.log.
start_peer() {
    local name=$1 port=$2 template_dir=${3:-} dir=$WORK/$1
    rm -rf "$dir" && mkdir -p "$dir"
    [[ -n $template_dir ]] && cp "$template_dir/lime-c25519.sqlite3" "$dir/"
    {
        printf '[storage]\ndata_dir = "%s"\ncurves = ["c25519"]\n' "$dir"
        printf '[limits]\nmax_bundle_requests = 0\n'
        cat
    } >"$dir/lime-server.toml"
    "$BIN/lime-server" --config "$dir/lime-server.toml" serve --listen "127.0.0.1:$port" \
        2>"$WORK/$name.log" &
    printf -v "${name}_pid" '%s' "$!"
    pids+=("$!")
    wait_for_health https "$port"
}

# B: example.org, the seeded devices, accepts A by digest. Its 401s are logged at
# debug ("no credentials yet"), counted after the run.
start_b() {
    start_peer b "$B_PORT" "$template" <<EOF
[log]
level = "warn,lime_server::http=debug"
max_lines_per_second = 0
[auth.digest]
nonce_secret_file = "$WORK/nonce.secret"
[federation]
domains = ["example.org"]
[[federation.accept_from]]
domains = ["a.example"]
digest_ha1_file = "$WORK/a-at-b.ha1"
EOF
}

# A: a.example, forwards example.org to B.
start_a() {
    start_peer a "$A_PORT" <<EOF
[log]
level = "warn"
[federation]
domains = ["a.example"]
[[federation.forward_to]]
domains = ["example.org"]
url = "https://127.0.0.1:$B_PORT/"
digest_ha1_file = "$WORK/a-at-b.ha1"
ca_file = "$WORK/b/tls/self-signed.crt"
EOF
}

cpu_ms() { # PID: user+system CPU time in ms
    awk '{ print ($14 + $15) * 1000 / '"$(getconf CLK_TCK)"' }' "/proc/$1/stat"
}

run() {
    local mode=$1 conns=$2
    start_b
    local url=https://127.0.0.1:$B_PORT/ ca=$WORK/b/tls/self-signed.crt
    local sender="sip:load-client@example.org;gr=urn:uuid:00000000-0000-0000-0000-ffffffffffff"
    if [[ $mode == forwarded ]]; then
        start_a
        url=https://127.0.0.1:$A_PORT/ ca=$WORK/a/tls/self-signed.crt
        sender="sip:load-client@a.example;gr=urn:uuid:00000000-0000-0000-0000-ffffffffffff"
    fi
    local b_before
    # shellcheck disable=SC2154 # b_pid: set by start_peer's printf -v
    b_before=$(cpu_ms "$b_pid")
    local out
    out=$("$BIN/lime-load" bundles --url "$url" --ca "$ca" --curve c25519 \
        --devices "$DEVICES" --per-request "$PER_REQUEST" --connections "$conns" \
        --requests "$REQUESTS" --server-pid "${a_pid:-$b_pid}" --sender "$sender")
    echo "$out"
    if [[ $mode == forwarded ]]; then
        local requests_done b_cpu
        requests_done=$(sed -nE 's/^bundles: ([0-9]+) requests.*/\1/p' <<<"$out")
        b_cpu=$(awk -v a="$(cpu_ms "$b_pid")" -v b="$b_before" -v n="$requests_done" \
            'BEGIN { printf "%.3f", (a - b) / n }')
        echo "  peer B CPU: $b_cpu ms/request (the first figure above is A's)"
        echo "  A's connections to B: $(ss -Htn state established "( dport = :$B_PORT )" | wc -l)"
        echo "  401s B answered: $(grep -c 'no credentials yet' "$WORK/b.log" || true)"
    fi
    stop_servers
    a_pid=
}

machine_line
summary=()
a_pid=
for conns in $CONNECTIONS; do
    for mode in $MODES; do
        rates=() p50s=() p99s=()
        for _ in $(seq "$REPEAT"); do
            echo "== $mode connections=$conns devices/request=$PER_REQUEST"
            out=$(run "$mode" "$conns")
            echo "$out"
            rates+=("$(report_rate <<<"$out")")
            p50s+=("$(report_latency p50 <<<"$out")")
            p99s+=("$(report_latency p99 <<<"$out")")
        done
        summary+=("$mode conns=$conns: $(printf '%s\n' "${rates[@]}" | median) req/s, p50 $(printf '%s\n' "${p50s[@]}" | median) ms, p99 $(printf '%s\n' "${p99s[@]}" | median) ms")
    done
done
echo "== medians of $REPEAT runs ($PER_REQUEST devices a request)"
printf '%s\n' "${summary[@]}"
