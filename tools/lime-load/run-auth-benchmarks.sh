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

BIN=${BIN:-target/release}
WORK=${1:-/tmp/lime-auth-bench}
DEVICES=${DEVICES:-1000}
OPKS=${OPKS:-1000}
REQUESTS=${REQUESTS:-20000}
REPEAT=${REPEAT:-3}
CONNECTIONS=${CONNECTIONS:-1 16}
MODES=${MODES:-off requests digest-sqlite digest-sqlite-401 digest-mariadb digest-mariadb-401 digest-mariadb-nocache}
PORT=${PORT:-25700}
USER_NAME=load-client
DOMAIN=example.org
PASSWORD=load-password
SENDER="sip:$USER_NAME@$DOMAIN;gr=urn:uuid:00000000-0000-0000-0000-ffffffffffff"

mkdir -p "$WORK"
template=$WORK/template-$DEVICES-$OPKS
run=$WORK/run
if [[ ! -f $template/lime-c25519.sqlite3 ]]; then
    rm -rf "$template"
    "$BIN/lime-load" seed --data-dir "$template" --curve c25519 --devices "$DEVICES" \
        --opks-per-device "$OPKS"
fi

# The account, in a flexisip-account-manager-shaped database: both hashes.
ha1() { printf '%s' "$USER_NAME:$DOMAIN:$PASSWORD" | "$1" | cut -d' ' -f1; }
accounts_sql="CREATE TABLE accounts (id INTEGER PRIMARY KEY, username VARCHAR(64) NOT NULL,
  domain VARCHAR(64) NOT NULL, UNIQUE (username, domain));
CREATE TABLE passwords (id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL,
  password VARCHAR(255) NOT NULL, algorithm VARCHAR(10) NOT NULL, UNIQUE (account_id, algorithm));
INSERT INTO accounts (id, username, domain) VALUES (1, '$USER_NAME', '$DOMAIN');
INSERT INTO passwords (id, account_id, password, algorithm) VALUES
  (1, 1, '$(ha1 md5sum)', 'MD5'), (2, 1, '$(ha1 sha256sum)', 'SHA-256');"
rm -f "$WORK/accounts.sqlite3"
python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).executescript(sys.argv[2])' \
    "$WORK/accounts.sqlite3" "$accounts_sql"
mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS lime_auth_bench; CREATE DATABASE lime_auth_bench;"
mysql -h 127.0.0.1 -u root lime_auth_bench -e "$accounts_sql"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/nonce.secret"

server_pid=
stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap stop_server EXIT

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

server_run() {
    local mode=$1 conns=$2 digest=()
    rm -rf "$run" && mkdir -p "$run" && cp "$template/lime-c25519.sqlite3" "$run/"
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
    [[ $mode == digest-* ]] && digest=(--digest "$USER_NAME:$PASSWORD")
    # "-401": Linphone's way, a 401 then the authenticated request.
    [[ $mode == *-401 ]] && digest+=(--challenged-each-time)
    "$BIN/lime-server" --config "$run/lime-server.toml" serve --listen "127.0.0.1:$PORT" \
        2>>"$WORK/server.log" &
    server_pid=$!
    for _ in $(seq 100); do
        curl -skf "https://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 0.1
    done
    "$BIN/lime-load" bundles --url "https://127.0.0.1:$PORT/" --ca "$run/tls/self-signed.crt" \
        --curve c25519 --devices "$DEVICES" --connections "$conns" --requests "$REQUESTS" \
        --server-pid "$server_pid" --sender "$SENDER" "${digest[@]}"
    stop_server
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%FT%TZ)"
summary=()
for conns in $CONNECTIONS; do
    for mode in $MODES; do
        rates=() cpus=()
        for _ in $(seq "$REPEAT"); do
            echo "== $mode connections=$conns"
            out=$(server_run "$mode" "$conns")
            echo "$out"
            rates+=("$(sed -nE 's/.*rate: ([0-9.]+) requests.*/\1/p' <<<"$out" | head -1)")
            cpus+=("$(sed -nE 's/.*server CPU: ([0-9.]+) ms.request.*/\1/p' <<<"$out" | head -1)")
        done
        summary+=("$mode conns=$conns: $(printf '%s\n' "${rates[@]}" | median) req/s, server CPU $(printf '%s\n' "${cpus[@]}" | median) ms/request")
    done
done
mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS lime_auth_bench;"
echo "== medians of $REPEAT runs"
printf '%s\n' "${summary[@]}"
