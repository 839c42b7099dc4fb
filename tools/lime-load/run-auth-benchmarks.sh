#!/usr/bin/env bash
# What authentication costs a request: getPeerBundle over loopback HTTPS, C25519,
# SQLite key store, with authentication off and with HTTP Digest, the accounts on
# SQLite and on the local MariaDB (kept for accounts_cache_secs, or looked up on
# every request: "-nocache"). Digest two ways: the client reusing its nonce, so
# every request carries credentials the server checks; and, "-401", as Linphone
# (liblinphone 5.1, belle-sip) talks: each request sent without credentials, its
# 401 answered on the same connection (a pair per timed request); and, as
# mode "requests", with the bundle request limitation on (every bundle recorded in
# Requests and counted; the limit never reached). Prints lime-load's report per
# run and a summary of medians.
#
# Usage: cargo build --release -p lime-server -p lime-load &&
#        tools/lime-load/run-auth-benchmarks.sh [WORK_DIR]
# Environment: DEVICES (1000), OPKS (1000), REQUESTS (20000), REPEAT (3),
# CONNECTIONS ("1 16"), MODES ("off requests digest-sqlite digest-sqlite-401
# digest-mariadb digest-mariadb-401 digest-mariadb-nocache"), PORT (25700).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"

BIN=${BIN:-target/release}
WORK=${1:-/tmp/lime-auth-bench}
DEVICES=${DEVICES:-1000}
OPKS=${OPKS:-1000}
REQUESTS=${REQUESTS:-20000}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-1 16}
MODES=${MODES:-off requests digest-sqlite digest-sqlite-401 digest-mariadb digest-mariadb-401 digest-mariadb-nocache}
PORT=${PORT:-25700}

mkdir -p "$WORK"
template=$WORK/template-$DEVICES-$OPKS
run=$WORK/run
seed_template "$BIN/lime-load" "$template" c25519 "$DEVICES" "$OPKS"

make_accounts "$WORK/accounts.sqlite3" lime_auth_bench
make_nonce_secret "$WORK/nonce.secret"
trap stop_server EXIT

server_run() {
    local mode=$1 conns=$2 digest=()
    fresh_copy "$template" "$run"
    {
        printf '[storage]\ndata_dir = "%s"\ncurves = ["c25519"]\n' "$run"
        # "requests": bundle requests recorded and counted, the limit never reached.
        if [[ $mode == requests ]]; then max=1000000000; else max=0; fi
        printf '[limits]\nmax_bundle_requests = %s\n[log]\nlevel = "warn"\n' "$max"
        case $mode in
        digest-sqlite*) printf '[auth.digest]\naccounts_url = "sqlite://%s"\n' "$WORK/accounts.sqlite3" ;;
        digest-mariadb*) printf '[auth.digest]\naccounts_url = "mysql://root@127.0.0.1/lime_auth_bench"\n' ;;
        esac
        [[ $mode == digest-* ]] && printf 'nonce_secret_file = "%s"\n' "$WORK/nonce.secret"
        # "-nocache": an account lookup per request.
        [[ $mode == *-nocache ]] && printf 'accounts_cache_secs = 0\n'
        true
    } >"$run/lime-server.toml"
    [[ $mode == digest-* ]] && digest=(--digest "$ACCOUNT_USER:$ACCOUNT_PASSWORD")
    # "-401": Linphone's way, a 401 then the authenticated request.
    [[ $mode == *-401 ]] && digest+=(--challenged-each-time)
    start_server "$BIN/lime-server" "$run/lime-server.toml" https "$PORT" "$WORK/server.log"
    "$BIN/lime-load" bundles --url "https://127.0.0.1:$PORT/" --ca "$run/tls/self-signed.crt" \
        --curve c25519 --devices "$DEVICES" --connections "$conns" --requests "$REQUESTS" \
        --server-pid "$server_pid" --sender "$ACCOUNT_SENDER" "${digest[@]}"
    stop_server
}

machine_line
summary=()
for conns in $CONNECTIONS; do
    for mode in $MODES; do
        rates=() cpus=()
        for _ in $(seq "$REPEAT"); do
            echo "== $mode connections=$conns"
            out=$(server_run "$mode" "$conns")
            echo "$out"
            rates+=("$(report_rate <<<"$out")")
            cpus+=("$(report_server_cpu <<<"$out")")
        done
        summary+=("$mode conns=$conns: $(printf '%s\n' "${rates[@]}" | median) req/s, server CPU $(printf '%s\n' "${cpus[@]}" | median) ms/request")
    done
done
drop_db mariadb lime_auth_bench
echo "== medians of $REPEAT runs"
printf '%s\n' "${summary[@]}"
