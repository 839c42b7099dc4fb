#!/usr/bin/env bash
# Database-server benchmarks (docs/benchmarks-databases.md): getPeerBundle claims/s
# through the server (plain HTTP; one HTTPS run) at 1, 16 and 64 connections, next
# to the raw claim transaction (lime-load raw-db-claims) at the same concurrency,
# and registerUser with 100 OPks at 16 connections.
#
# Usage (from the workspace root, after `cargo build --release -p lime-server -p lime-load`):
#   tools/lime-load/run-db-benchmarks.sh mariadb|postgres
# Environment: PARTS ("16 register 64 https": which parts to run), PORT (26700).
# Needs the local servers: MariaDB 127.0.0.1:3306 (root, no password), PostgreSQL
# 127.0.0.1:5432 (postgres, trust). Drops and recreates the database
# lime_bench_c25519 (drop it afterwards); writes to /tmp/limebench.
# Raw and server runs are interleaved (raw, server, raw, server...) so that each
# pair sees the same machine load.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
backend=$1
B=/tmp/limebench; mkdir -p $B; BIN=target/release; PORT=${PORT:-26700}; DEVICES=1000; OPKS=200
STORE=$(db_url "$backend" lime_bench)
reseed() { seed_db $BIN/lime-load "$backend" lime_bench c25519 $DEVICES $OPKS; }
server_pid=
stop() { if [[ -n $server_pid ]]; then kill $server_pid; wait $server_pid 2>/dev/null || true; server_pid=; fi; }
trap stop EXIT
start() { # pool scheme
  local pool=$1 scheme=$2 plain=()
  [[ $scheme == http ]] && plain=(--plain-http)
  printf '[storage]\ndata_dir = "%s/data"\ncurves = ["c25519"]\npool_size = %s\n[limits]\nmax_bundle_requests = 0\n[log]\nlevel = "warn"\n' $B $pool > $B/lime-server-$pool.toml
  $BIN/lime-server --config $B/lime-server-$pool.toml serve --listen 127.0.0.1:$PORT "${plain[@]}" --store "$STORE" 2>>$B/server-$backend.log &
  server_pid=$!
  wait_for_health "$scheme" "$PORT"
}
raw() { echo "== raw $backend C=$1 run $2"; $BIN/lime-load raw-db-claims --store "$STORE" --curve c25519 --devices $DEVICES --requests $3 --connections $1; }
srv() { echo "== server-http $backend pool=$4 C=$1 run $2"; $BIN/lime-load bundles --url http://127.0.0.1:$PORT/ --curve c25519 --devices $DEVICES --requests $3 --connections $1 --server-pid $server_pid; }
echo "== $backend $(uptime)"
PARTS=${PARTS:-"16 register 64 https"}
if [[ $PARTS == *16* ]]; then
  reseed
  start 16 http
  for i in 1 2 3; do
    raw 1 $i 3500; srv 1 $i 3500 16
    raw 16 $i 10000; srv 16 $i 10000 16
  done
  stop
fi
if [[ $PARTS == *register* ]]; then
  start 16 http
  for i in 1 2 3; do
    echo "== register $backend pool=16 C=16 OPks=100 run $i"
    $BIN/lime-load register --url http://127.0.0.1:$PORT/ --plain --curve c25519 --requests 2500 --connections 16 --opks 100
  done
  stop
fi
if [[ $PARTS == *64* ]]; then
  reseed
  # The server is stopped during the raw runs: PostgreSQL allows 100 connections.
  for i in 1 2 3; do
    raw 64 $i 10000
    start 64 http; srv 64 $i 10000 64; stop
  done
fi
if [[ $PARTS == *https* ]]; then
  start 16 https
  echo "== server-https $backend pool=16 C=16 run 1"
  raw 16 h 10000
  $BIN/lime-load bundles --url https://127.0.0.1:$PORT/ --ca $B/data/tls/self-signed.crt --curve c25519 --devices $DEVICES --requests 10000 --connections 16 --server-pid $server_pid
  stop
fi
echo "== done $backend $(uptime)"
