#!/usr/bin/env bash
# Galera benchmarks (docs/benchmarks-databases.md, "Galera cluster"): getPeerBundle
# claims/s through 1, 2 and 3 lime-server instances, each on its own node of a
# 3-node MariaDB Galera cluster on this machine (scripts/galera-cluster.sh), and 3
# instances all on node 1 (instances without certification conflicts between
# nodes); certification aborts per 1,000 claims (lime_store_retries_total{at=
# "commit"} of the instances) and p99. A last run asks for few devices ("hot":
# claims of one device on several nodes at once).
#
# Usage (from the workspace root, after `cargo build --release -p lime-server -p lime-load`):
#   tools/lime-load/run-galera-benchmarks.sh
# Environment: DEVICES (100), OPKS (100), REQUESTS (2000), CONNECTIONS (16),
# HOT_DEVICES (8), HOT_REQUESTS (600), PORT (26800: instance i listens on PORT+i,
# its metrics on PORT+10+i). The cluster's SQL ports are 3321-3323 (group
# communication 4601-4603, IST 4611-4613, SST 4621-4623); writes to /tmp/limegalera.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
BIN=target/release
require_tools $BIN lime-server lime-load
B=/tmp/limegalera
DIR=$B/cluster
export GALERA_SQL_PORT=3320 GALERA_PORT=4600
DEVICES=${DEVICES:-100} OPKS=${OPKS:-100} REQUESTS=${REQUESTS:-2000}
CONNECTIONS=${CONNECTIONS:-16} HOT_DEVICES=${HOT_DEVICES:-8} HOT_REQUESTS=${HOT_REQUESTS:-600}
PORT=${PORT:-26800}
DATABASE=lime_gbench

pids=()
stop_instances() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
cleanup() {
    stop_instances
    scripts/galera-cluster.sh stop "$DIR"
}
trap cleanup EXIT

node_url() { echo "mysql://root@127.0.0.1:$((GALERA_SQL_PORT + $1))/${DATABASE}_{curve}"; }

# reseed: the database dropped, made again on node 1 and seeded (replicated to all).
reseed() {
    mariadb --no-defaults -h127.0.0.1 -P$((GALERA_SQL_PORT + 1)) -uroot -e \
        "DROP DATABASE IF EXISTS ${DATABASE}_c25519; CREATE DATABASE ${DATABASE}_c25519"
    $BIN/lime-load seed-db --store "$(node_url 1)" --curve c25519 --devices "$DEVICES" \
        --opks-per-device "$OPKS" 2>&1 | { grep -v retrying || true; }
}

# start_instances NODE...: one instance per argument, on that node.
start_instances() {
    local i=0 node config
    for node in "$@"; do
        i=$((i + 1))
        config=$B/lime-server-$i.toml
        printf '[storage]\ndata_dir = "%s/data%s"\ncurves = ["c25519"]\npool_size = 16\n[limits]\nmax_bundle_requests = 0\n[log]\nlevel = "warn"\n[metrics]\nlisten = "127.0.0.1:%s"\n' \
            "$B" "$i" $((PORT + 10 + i)) >"$config"
        $BIN/lime-server --config "$config" serve --listen 127.0.0.1:$((PORT + i)) --plain-http \
            --store "$(node_url "$node")" 2>>$B/server.log &
        pids+=($!)
        wait_for_health http $((PORT + i))
    done
}

# The instances' lime_store_retries_total{at=$1}, summed.
retries() {
    local i sum=0 value
    for ((i = 1; i <= ${#pids[@]}; i++)); do
        value=$(curl -sf "http://127.0.0.1:$((PORT + 10 + i))/metrics" |
            sed -nE "s/^lime_store_retries_total\\{.*at=\"$1\".*\\} ([0-9.e+]+)$/\\1/p" | head -1)
        sum=$(awk -v a="$sum" -v b="${value:-0}" 'BEGIN { print a + b }')
    done
    echo "$sum"
}

# run LABEL DEVICES REQUESTS NODE...: a fresh database, instances on NODE..., the
# load spread over them; one line of figures.
run() {
    local label=$1 devices=$2 requests=$3 urls="" i report
    shift 3
    reseed
    start_instances "$@"
    for ((i = 1; i <= $#; i++)); do urls+="${urls:+,}http://127.0.0.1:$((PORT + i))/"; done
    report=$($BIN/lime-load bundles --url "$urls" --curve c25519 --devices "$devices" \
        --requests "$requests" --connections "$CONNECTIONS")
    echo "$report" >>$B/reports.log
    local commit statement
    commit=$(retries commit)
    statement=$(retries statement)
    printf '%-34s %8s bundles/s  p99 %6s ms  certification aborts %5s (%s per 1,000 claims)  rolled back at a statement %s\n' \
        "$label" "$(report_rate <<<"$report")" "$(report_latency p99 <<<"$report")" "$commit" \
        "$(awk -v a="$commit" -v r="$requests" 'BEGIN { printf "%.1f", 1000 * a / r }')" "$statement"
    grep -E 'errors|flags' <<<"$report" | sed 's/^/    /' || true
    stop_instances
}

# What wsrep_sync_wait = 1 (set by the store on every connection) costs one read:
# READS single-row SELECTs on node 2 over one connection, without and with it,
# alternately, 3 times each (the first pass also warms the node's cache).
sync_wait_cost() {
    local reads=${READS:-2000} wait start elapsed
    for wait in 0 1 0 1 0 1; do
        {
            echo "SET SESSION wsrep_sync_wait = $wait;"
            for ((i = 0; i < reads; i++)); do echo "SELECT id FROM OPk WHERE Uid = $((i % DEVICES + 1)) LIMIT 1;"; done
        } >$B/reads-$wait.sql
        start=$(date +%s%N)
        mariadb --no-defaults -h127.0.0.1 -P$((GALERA_SQL_PORT + 2)) -uroot ${DATABASE}_c25519 \
            <$B/reads-$wait.sql >/dev/null
        elapsed=$(($(date +%s%N) - start))
        printf 'wsrep_sync_wait = %s: %s reads on node 2 in %s ms (%s us per read)\n' "$wait" \
            "$reads" $((elapsed / 1000000)) $((elapsed / 1000 / reads))
    done
}

mkdir -p $B
: >$B/reports.log
scripts/galera-cluster.sh stop "$DIR"
machine_line
echo "load before: $(uptime)"
scripts/galera-cluster.sh start "$DIR" 3
echo "C=$CONNECTIONS connections, $REQUESTS requests of 1 device among $DEVICES ($OPKS OPks each)"
run "1 instance, node 1" "$DEVICES" "$REQUESTS" 1
run "2 instances, nodes 1-2" "$DEVICES" "$REQUESTS" 1 2
run "3 instances, nodes 1-3" "$DEVICES" "$REQUESTS" 1 2 3
run "3 instances, all on node 1" "$DEVICES" "$REQUESTS" 1 1 1
run "hot: 3 instances, nodes 1-3, $HOT_DEVICES dev" "$HOT_DEVICES" "$HOT_REQUESTS" 1 2 3
run "hot: 1 instance, node 1, $HOT_DEVICES dev" "$HOT_DEVICES" "$HOT_REQUESTS" 1
reseed
sync_wait_cost
echo "load after: $(uptime)"
