#!/usr/bin/env bash
# Two server binaries side by side, "base" (before a change) and "new" (after it),
# in one run: every scenario's runs interleaved (base, new, base, new...), the
# server pinned to one CPU and lime-load to another, each run's report printed
# (with the CPU other processes used meanwhile; a disturbed run is done again),
# then a markdown table of medians. docs/benchmarks.md says what each scenario
# measures and how to read it.
#
# Scenarios (SCENARIOS, all by default):
#   latency    getPeerBundle of 1 device claiming an OPk, CONNECTIONS connections,
#              default durability and request limit on (limits never reached),
#              fresh SQLite store per run: requests/s, p50/p99/p99.9, server CPU,
#              the WAL file's largest size during the run and its size at the end.
#              Then the same paced (lime-load --rate) at each fraction of
#              LATENCY_LOADS of the slower side's closed-loop rate: the latency of
#              a server that is not saturated, counted from each request's
#              scheduled time. Closed-loop latency is mostly queueing: with C
#              connections at R requests/s, a request waits C/R on average.
#   limit      the same with the limit off and on (LIMIT_REQUESTS a run), on each
#              store of STORES (sqlite mariadb postgres): throughput and CPU, on/off;
#              for each count of LIMIT_SENDERS: 1 (every request from one user,
#              whose claims take turns on a database server) and one user per
#              connection.
#   digest401  Linphone's request shape, a 401 then the authenticated request on
#              one connection (accounts on SQLite and on MariaDB), against one
#              unauthenticated request: server CPU of the pair / CPU of the plain one.
#   many       getPeerBundle of MANY_SIZES devices for each of MANY_CURVES: server
#              CPU per device, latency per request; and 1-device requests with and
#              without one connection sending HOL_PER_REQUEST-device requests
#              back to back (head-of-line blocking).
#   idle       server RSS with IDLE_COUNTS idle keep-alive TLS connections.
#
# Usage, from the workspace root:
#   cargo build --release -p lime-server -p lime-load
#   BASELINE=/path/to/old/release tools/lime-load/run-performance-benchmarks.sh [WORK_DIR]
# BASELINE is the old lime-server binary or the directory holding it (and, best,
# its lime-load: each side's stores are seeded with its own schema). Without
# BASELINE, git revision BASE_REV (main) is exported to WORK_DIR/baseline-src (git
# archive) and built into WORK_DIR/baseline-target (build-baseline.sh). BIN (target/release):
# the new binaries; its lime-load generates the load for both sides.
#
# Settings (environment, default in parentheses):
#   SCENARIOS ("latency limit digest401 many idle"), REPEAT (3: runs per side and
#   configuration), MAX_OTHERS (0.5: CPU seconds other processes may use during a
#   run before it is done again, at most MAX_ATTEMPTS (5) times; a run kept anyway
#   is marked * in the table), SERVER_CPU (0) and LOAD_CPU (1): taskset CPUs (empty:
#   no pinning), PORT (25900), WORK_DIR (/tmp/lime-perf-bench).
#   latency:   DEVICES (1000), OPKS (1000), CONNECTIONS (32), REQUESTS (100000),
#              LATENCY_LOADS ("0.5": fractions of the closed-loop rate; empty: no
#              paced runs).
#   limit:     STORES ("sqlite mariadb postgres"), LIMIT_REQUESTS (30000),
#              LIMIT_SENDERS ("1 CONNECTIONS"),
#              DB_OPKS (100: OPks per device in the MariaDB/PostgreSQL stores).
#   digest401: DIGEST_REQUESTS (20000), DIGEST_CONNECTIONS (CONNECTIONS).
#   many:      MANY_CURVES ("c25519 c448mlk1024"), MANY_SIZES ("10 100 1000"),
#              MANY_STORES (sqlite; mariadb and postgres run C25519 only), MANY_HOL
#              (on; off leaves out the head-of-line runs, which are SQLite's),
#              MANY_DEVICES (2000 seeded), MANY_OPKS (40), MANY_CLAIMS (20000 devices
#              asked per run), MANY_CONNECTIONS (1: each a user of its own),
#              MANY_LIMIT (on; "off on": both, and their throughput's ratio; the
#              head-of-line runs take the last), HOL_PER_REQUEST
#              (1000), HOL_CONNECTIONS (16), HOL_REQUESTS (5000), HOL_OPKS (200),
#              HOL_RATES ("500": paced runs of the small requests, requests/s in
#              all; empty: only the closed loop).
#   idle:      IDLE_COUNTS ("0 1000 10000"), IDLE_HOLD (10 s), IDLE_REPEAT (1); the
#              server runs with max_connections = the largest count + 100 and
#              idle_timeout_ms = 600000, and the open-file limit is raised to its
#              hard limit.
# A quick check that everything runs (1-2 minutes of runs, plus seeding):
#   SCENARIOS="latency limit digest401 many idle" REQUESTS=5000 LIMIT_REQUESTS=3000 \
#   DIGEST_REQUESTS=2000 MANY_CLAIMS=2000 HOL_REQUESTS=2000 IDLE_COUNTS="0 1000" \
#   IDLE_HOLD=2 REPEAT=1 MAX_ATTEMPTS=1 BASELINE=target/release \
#   tools/lime-load/run-performance-benchmarks.sh /tmp/lime-perf-smoke
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source-path=SCRIPTDIR source=bench-lib.sh
source "$here/bench-lib.sh"

WORK=${1:-/tmp/lime-perf-bench}
BIN=${BIN:-target/release}
BASELINE=${BASELINE:-}
BASE_REV=${BASE_REV:-main}
SCENARIOS=${SCENARIOS:-latency limit digest401 many idle}
REPEAT=${REPEAT:-3}
PORT=${PORT:-25900}
SERVER_CPU=${SERVER_CPU-0}
LOAD_CPU=${LOAD_CPU-1}
DEVICES=${DEVICES:-1000}
OPKS=${OPKS:-1000}
CONNECTIONS=${CONNECTIONS:-32}
REQUESTS=${REQUESTS:-100000}
LATENCY_LOADS=${LATENCY_LOADS-0.5}
STORES=${STORES:-sqlite mariadb postgres}
LIMIT_REQUESTS=${LIMIT_REQUESTS:-30000}
DB_OPKS=${DB_OPKS:-100}
DIGEST_REQUESTS=${DIGEST_REQUESTS:-20000}
DIGEST_CONNECTIONS=${DIGEST_CONNECTIONS:-$CONNECTIONS}
MANY_CURVES=${MANY_CURVES:-c25519 c448mlk1024}
MANY_SIZES=${MANY_SIZES:-10 100 1000}
MANY_DEVICES=${MANY_DEVICES:-2000}
MANY_OPKS=${MANY_OPKS:-40}
MANY_CLAIMS=${MANY_CLAIMS:-20000}
MANY_CONNECTIONS=${MANY_CONNECTIONS:-1}
MANY_LIMIT=${MANY_LIMIT:-on}
MANY_STORES=${MANY_STORES:-sqlite}
MANY_HOL=${MANY_HOL:-on}
HOL_PER_REQUEST=${HOL_PER_REQUEST:-1000}
HOL_CONNECTIONS=${HOL_CONNECTIONS:-16}
HOL_REQUESTS=${HOL_REQUESTS:-5000}
HOL_OPKS=${HOL_OPKS:-200}
HOL_RATES=${HOL_RATES-500}
IDLE_COUNTS=${IDLE_COUNTS:-0 1000 10000}
IDLE_HOLD=${IDLE_HOLD:-10}
IDLE_REPEAT=${IDLE_REPEAT:-1}
export MAX_OTHERS=${MAX_OTHERS:-0.5} SERVER_CPU

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
require_tools "$BIN" lime-server lime-load
BIN=$(cd "$BIN" && pwd)

# The baseline: given, or built from BASE_REV in a directory of its own.
if [[ -z $BASELINE ]]; then
    BASELINE=$("$here/build-baseline.sh" "$BASE_REV" "$WORK")
fi
[[ -d $BASELINE ]] || BASELINE=$(dirname "$BASELINE")
require_tools "$BASELINE" lime-server
BASELINE=$(cd "$BASELINE" && pwd)

# server_of SIDE, seeder_of SIDE: each side's server, and the lime-load whose
# schema its stores are seeded with (the baseline's own when it has one).
server_of() { if [[ $1 == base ]]; then echo "$BASELINE/lime-server"; else echo "$BIN/lime-server"; fi; }
seeder_of() {
    if [[ $1 == base && -x $BASELINE/lime-load ]]; then echo "$BASELINE/lime-load"; else echo "$BIN/lime-load"; fi
}
SIDES=(base new)

load_pin=()
[[ -n $LOAD_CPU ]] && load_pin=(taskset -c "$LOAD_CPU")
# The load generator (always the new lime-load), pinned.
lime_load() { "${load_pin[@]}" "$BIN/lime-load" "$@"; }

trap stop_server EXIT

# write_config RUN_DIR CURVES LIMIT [EXTRA]: the server's configuration, on
# RUN_DIR's stores of CURVES ("c25519 c448mlk1024"), the bundle request limit on
# (every bundle recorded and counted, limits far out of reach) or off, plus EXTRA
# (TOML text). Durability is the default (sqlite_synchronous = "full").
write_config() {
    local run=$1 limit=$3 extra=${4:-} curve_list list
    read -ra curve_list <<<"$2"
    list=$(printf '"%s", ' "${curve_list[@]}")
    {
        printf '[storage]\ndata_dir = "%s"\ncurves = [%s]\n' "$run" "${list%, }"
        printf '[log]\nlevel = "warn"\n[limits]\n'
        if [[ $limit == on ]]; then
            printf 'max_bundle_requests = 1000000000\nmax_bundle_requests_per_identity = 1000000000\nmax_recorded_requests_per_identity = 1000000000\n'
        else
            printf 'max_bundle_requests = 0\n'
        fi
        printf '%s' "$extra"
    } >"$run/lime-server.toml"
}

# bench_run SIDE STORE TEMPLATE CURVES LIMIT EXTRA LIME-LOAD-ARGS...: one run on a
# fresh store (SQLite: a copy of TEMPLATE, a directory, or empty; MariaDB and
# PostgreSQL: a copy of database TEMPLATE_c25519), the side's server started on
# it, lime-load with the given arguments (plus the URL, CA and server pid), the
# server stopped. Prints lime-load's report; fails when lime-load does.
RUN=$WORK/run
bench_run() {
    local side=$1 store=$2 template=$3 curves=$4 limit=$5 extra=$6 store_args=() status=0
    shift 6
    rm -rf "$RUN" && mkdir -p "$RUN"
    case $store in
    sqlite) [[ -n $template ]] && fresh_copy "$template" "$RUN" ;;
    *)
        copy_db "$store" "${template}_c25519" lime_perf_run_c25519 >/dev/null
        store_args=(--store "$(db_url "$store" lime_perf_run)")
        ;;
    esac
    write_config "$RUN" "$curves" "$limit" "$extra"
    start_server "$(server_of "$side")" "$RUN/lime-server.toml" https "$PORT" \
        "$WORK/server-$side.log" "${store_args[@]}"
    lime_load "$@" --url "https://127.0.0.1:$PORT/" --ca "$RUN/tls/self-signed.crt" \
        --server-pid "$server_pid" || status=$?
    stop_server
    return "$status"
}

# Results: record SCENARIO FIGURE SIDE VALUE MARK; the table prints the median of
# each (scenario, figure, side) in the order first recorded.
declare -A values=() marks=()
order=()
record() {
    local key="$1|$2"
    [[ -v "values[$key|base]" || -v "values[$key|new]" ]] || order+=("$key")
    values[$key|$3]+="${4:-} "
    [[ -n ${5:-} ]] && marks[$key|$3]=$5
    return 0
}
median_of() {
    local runs
    read -ra runs <<<"${values[$1|$2]:-}"
    printf '%s\n' "${runs[@]}" | median
}
# ratio SCENARIO FIGURE NUMERATOR DENOMINATOR: a row of medians' ratios, per side.
ratio() {
    local side a b
    for side in "${SIDES[@]}"; do
        a=$(median_of "$1|$3" "$side") b=$(median_of "$1|$4" "$side")
        record "$1" "$2" "$side" "$(awk -v a="$a" -v b="$b" 'BEGIN { if (a != "" && b > 0) printf "%.3f", a / b }')"
    done
}

# label SCENARIO... : the heading of one run's report.
label() { echo "== $* ($(date -u +%T))"; }

# record_bundles SCENARIO PREFIX SIDE: the usual figures of a bundles report ($out).
record_bundles() {
    local scenario=$1 prefix=$2 side=$3
    record "$scenario" "${prefix}requests/s" "$side" "$(report_rate <<<"$out")" "$mark"
    record "$scenario" "${prefix}p50 ms" "$side" "$(report_latency p50 <<<"$out")" "$mark"
    record "$scenario" "${prefix}p99 ms" "$side" "$(report_latency p99 <<<"$out")" "$mark"
    record "$scenario" "${prefix}p99.9 ms" "$side" "$(report_latency p99.9 <<<"$out")" "$mark"
    record "$scenario" "${prefix}server CPU ms/request" "$side" "$(report_server_cpu <<<"$out")" "$mark"
}

# templates: each side's SQLite stores seeded with its own lime-load.
template_dir() { echo "$WORK/templates/$1-$2-$3-$4"; } # SIDE CURVE DEVICES OPKS
seed_sides() { # CURVE DEVICES OPKS
    local side
    for side in "${SIDES[@]}"; do
        seed_template "$(seeder_of "$side")" "$(template_dir "$side" "$@")" "$@"
    done
}

scenario_latency() {
    local i side load rate
    seed_sides c25519 "$DEVICES" "$OPKS"
    for ((i = 1; i <= REPEAT; i++)); do
        for side in "${SIDES[@]}"; do
            label "latency side=$side run $i/$REPEAT: SQLite, limit on, $CONNECTIONS connections, $REQUESTS requests"
            latency_run "$side"
            record_bundles latency "" "$side"
            record latency "WAL largest MiB" "$side" \
                "$(sed -nE 's/.*file size: largest ([0-9.]+) MiB.*/\1/p' <<<"$out")" "$mark"
            record latency "WAL at the end MiB" "$side" \
                "$(sed -nE 's/.*MiB during the run, ([0-9.]+) MiB at the end.*/\1/p' <<<"$out")" "$mark"
        done
    done
    for load in $LATENCY_LOADS; do
        # The same offered rate on both sides: a share of the slower one's.
        rate=$(for side in "${SIDES[@]}"; do median_of "latency|requests/s" "$side"; done |
            awk -v share="$load" 'NR == 1 || $1 < min { min = $1 } END { if (min > 0) printf "%.0f", min * share }')
        [[ -n $rate ]] || continue
        for ((i = 1; i <= REPEAT; i++)); do
            for side in "${SIDES[@]}"; do
                label "latency side=$side run $i/$REPEAT: paced at $rate requests/s ($load of the closed-loop rate), $CONNECTIONS connections, $REQUESTS requests"
                latency_run "$side" --rate "$rate"
                record latency "paced at $rate/s ($load): p50 ms" "$side" "$(report_latency p50 <<<"$out")" "$mark"
                record latency "paced at $rate/s ($load): p99 ms" "$side" "$(report_latency p99 <<<"$out")" "$mark"
                record latency "paced at $rate/s ($load): p99.9 ms" "$side" "$(report_latency p99.9 <<<"$out")" "$mark"
            done
        done
    done
}

# latency_run SIDE [LIME-LOAD ARGUMENTS]: one run of the latency scenario.
latency_run() {
    local side=$1
    shift
    measure bench_run "$side" sqlite "$(template_dir "$side" c25519 "$DEVICES" "$OPKS")" \
        c25519 on "" bundles --curve c25519 --devices "$DEVICES" \
        --connections "$CONNECTIONS" --requests "$REQUESTS" \
        --watch-size "$RUN/lime-c25519.sqlite3-wal" "$@"
}

db_processes() { # STORE: the lime-load option naming the database server's process
    case $1 in
    mariadb) echo "--db-pid $(db_server_pid 3306)" ;;
    postgres) echo "--db-pid $(db_server_pid 5432)" ;;
    esac
}

scenario_limit() {
    local store senders i limit side template scenario db_args
    for store in $STORES; do
        if [[ $store == sqlite ]]; then
            seed_sides c25519 "$DEVICES" "$DEVICES_OPKS_LIMIT"
        else
            for side in "${SIDES[@]}"; do
                echo "== seeding $store for side $side ($DEVICES devices, $DB_OPKS OPks each)"
                seed_db "$(seeder_of "$side")" "$store" "lime_perf_tmpl_$side" c25519 "$DEVICES" "$DB_OPKS"
            done
        fi
        read -ra db_args <<<"$(db_processes "$store")"
        for senders in ${LIMIT_SENDERS:-1 $CONNECTIONS}; do
            scenario="limit $store, $senders sender(s)"
            for ((i = 1; i <= REPEAT; i++)); do
                for limit in off on; do
                    for side in "${SIDES[@]}"; do
                        template=lime_perf_tmpl_$side
                        [[ $store == sqlite ]] && template=$(template_dir "$side" c25519 "$DEVICES" "$DEVICES_OPKS_LIMIT")
                        label "$scenario side=$side run $i/$REPEAT: limit $limit, $CONNECTIONS connections, $LIMIT_REQUESTS requests"
                        measure bench_run "$side" "$store" "$template" c25519 "$limit" "" bundles \
                            --curve c25519 --devices "$DEVICES" --connections "$CONNECTIONS" \
                            --senders "$senders" --requests "$LIMIT_REQUESTS" "${db_args[@]}"
                        record "$scenario" "requests/s, limit $limit" "$side" "$(report_rate <<<"$out")" "$mark"
                        record "$scenario" "server CPU ms/request, limit $limit" "$side" "$(report_server_cpu <<<"$out")" "$mark"
                        if [[ $store != sqlite ]]; then
                            record "$scenario" "database CPU ms/request, limit $limit" "$side" \
                                "$(report_db_cpu <<<"$out")" "$mark"
                        fi
                    done
                done
            done
            ratio "$scenario" "throughput on / off" "requests/s, limit on" "requests/s, limit off"
            ratio "$scenario" "server CPU on / off" "server CPU ms/request, limit on" "server CPU ms/request, limit off"
        done
        [[ $store == sqlite ]] || drop_sides "$store"
    done
}

drop_sides() { # STORE: the scenario's databases
    local side
    for side in "${SIDES[@]}"; do drop_db "$1" "lime_perf_tmpl_${side}_c25519"; done
    drop_db "$1" lime_perf_run_c25519
}

scenario_digest401() {
    local i mode side extra load_args
    seed_sides c25519 "$DEVICES" "$DEVICES_OPKS_LIMIT"
    make_accounts "$WORK/accounts.sqlite3" lime_perf_accounts
    make_nonce_secret "$WORK/nonce.secret"
    for ((i = 1; i <= REPEAT; i++)); do
        for mode in plain pair-sqlite pair-mariadb; do
            for side in "${SIDES[@]}"; do
                extra='' load_args=()
                case $mode in
                pair-sqlite) extra=$(printf '[auth.digest]\naccounts_url = "sqlite://%s"\n' "$WORK/accounts.sqlite3") ;;
                pair-mariadb)
                    extra=$(printf '[auth.digest]\naccounts_url = "mysql://root@127.0.0.1/lime_perf_accounts"\n')
                    read -ra load_args <<<"$(db_processes mariadb)"
                    ;;
                esac
                if [[ $mode == pair-* ]]; then
                    extra+=$(printf '\nnonce_secret_file = "%s"\n' "$WORK/nonce.secret")
                    load_args+=(--digest "$ACCOUNT_USER:$ACCOUNT_PASSWORD" --challenged-each-time)
                fi
                label "digest401 side=$side run $i/$REPEAT: $mode, limit off, $DIGEST_CONNECTIONS connections, $DIGEST_REQUESTS requests"
                measure bench_run "$side" sqlite "$(template_dir "$side" c25519 "$DEVICES" "$DEVICES_OPKS_LIMIT")" \
                    c25519 off "$extra"$'\n' bundles --curve c25519 --devices "$DEVICES" \
                    --connections "$DIGEST_CONNECTIONS" --requests "$DIGEST_REQUESTS" \
                    --sender "$ACCOUNT_SENDER" "${load_args[@]}"
                record_bundles digest401 "$mode: " "$side"
            done
        done
    done
    ratio digest401 "CPU of the pair / plain, accounts on SQLite" \
        "pair-sqlite: server CPU ms/request" "plain: server CPU ms/request"
    ratio digest401 "CPU of the pair / plain, accounts on MariaDB" \
        "pair-mariadb: server CPU ms/request" "plain: server CPU ms/request"
    drop_db mariadb lime_perf_accounts
}

scenario_many() {
    local store curve size i side requests mode background template name db_args limit figure
    for store in $MANY_STORES; do
        for curve in $MANY_CURVES; do
            db_args=()
            if [[ $store == sqlite ]]; then
                seed_sides "$curve" "$MANY_DEVICES" "$MANY_OPKS"
                name="many $curve"
            elif [[ $curve != c25519 ]]; then
                echo "== many on $store: $curve left out (the database runs are C25519 only)"
                continue
            else
                for side in "${SIDES[@]}"; do
                    echo "== seeding $store for side $side ($MANY_DEVICES devices, $MANY_OPKS OPks each)"
                    seed_db "$(seeder_of "$side")" "$store" "lime_perf_tmpl_$side" c25519 "$MANY_DEVICES" "$MANY_OPKS"
                done
                read -ra db_args <<<"$(db_processes "$store")"
                name="many $curve, $store"
            fi
            for size in $MANY_SIZES; do
                requests=$((MANY_CLAIMS / size))
                ((requests > 0)) || requests=1
                for ((i = 1; i <= REPEAT; i++)); do
                    for limit in $MANY_LIMIT; do
                        figure="$size devices"
                        [[ $MANY_LIMIT == *" "* ]] && figure+=", limit $limit"
                        for side in "${SIDES[@]}"; do
                            template=lime_perf_tmpl_$side
                            [[ $store == sqlite ]] && template=$(template_dir "$side" "$curve" "$MANY_DEVICES" "$MANY_OPKS")
                            label "$name side=$side run $i/$REPEAT: $size devices a request, limit $limit, $MANY_CONNECTIONS connections, $requests requests"
                            # Each connection a user of its own, as in the limit scenario.
                            measure bench_run "$side" "$store" "$template" \
                                "$curve" "$limit" "" bundles --curve "$curve" --devices "$MANY_DEVICES" \
                                --per-request "$size" --connections "$MANY_CONNECTIONS" --requests "$requests" \
                                --senders "$MANY_CONNECTIONS" "${db_args[@]}"
                            local cpu_per_device
                            cpu_per_device=$(sed -nE 's/.*server CPU per device asked: ([0-9.]+) ms.*/\1/p' <<<"$out")
                            # One device a request: the per-request figure is the per-device one.
                            [[ -n $cpu_per_device ]] || cpu_per_device=$(report_server_cpu <<<"$out")
                            record "$name" "$figure: server CPU ms/device" "$side" "$cpu_per_device" "$mark"
                            record "$name" "$figure: p50 ms/request" "$side" "$(report_latency p50 <<<"$out")" "$mark"
                            record "$name" "$figure: p99 ms/request" "$side" "$(report_latency p99 <<<"$out")" "$mark"
                            record "$name" "$figure: requests/s" "$side" "$(report_rate <<<"$out")" "$mark"
                            [[ $store == sqlite ]] || record "$name" "$figure: database CPU ms/request" "$side" \
                                "$(report_db_cpu <<<"$out")" "$mark"
                        done
                    done
                done
                if [[ " $MANY_LIMIT " == *" off "* && " $MANY_LIMIT " == *" on "* ]]; then
                    ratio "$name" "$size devices: throughput on / off" \
                        "$size devices, limit on: requests/s" "$size devices, limit off: requests/s"
                fi
            done
            [[ $store == sqlite ]] || drop_sides "$store"
        done
    done
    [[ $MANY_HOL == off ]] && return 0

    # Head-of-line blocking: small requests with and without a stream of large ones,
    # sent in a closed loop, then paced at each of HOL_RATES (what a small request
    # waits for behind the large ones, without the queueing of a closed loop).
    seed_sides c25519 "$MANY_DEVICES" "$HOL_OPKS"
    local pace small pacing
    for pace in closed $HOL_RATES; do
        small=small
        pacing=()
        if [[ $pace != closed ]]; then
            small="small paced at $pace/s"
            pacing=(--rate "$pace")
        fi
        for ((i = 1; i <= REPEAT; i++)); do
            for mode in without with; do
                for side in "${SIDES[@]}"; do
                    background=()
                    [[ $mode == with ]] && background=(--background-connections 1 --background-per-request "$HOL_PER_REQUEST")
                    label "head-of-line side=$side run $i/$REPEAT: 1-device requests on $HOL_CONNECTIONS connections ($pace), $mode a connection of $HOL_PER_REQUEST-device requests"
                    measure bench_run "$side" sqlite "$(template_dir "$side" c25519 "$MANY_DEVICES" "$HOL_OPKS")" \
                        c25519 "${MANY_LIMIT##* }" "" bundles --curve c25519 --devices "$MANY_DEVICES" \
                        --connections "$HOL_CONNECTIONS" --requests "$HOL_REQUESTS" "${pacing[@]}" "${background[@]}"
                    record "head-of-line" "$small, $mode large: p50 ms" "$side" "$(report_latency p50 <<<"$out")" "$mark"
                    record "head-of-line" "$small, $mode large: p99 ms" "$side" "$(report_latency p99 <<<"$out")" "$mark"
                    record "head-of-line" "$small, $mode large: p99.9 ms" "$side" "$(report_latency p99.9 <<<"$out")" "$mark"
                    record "head-of-line" "$small, $mode large: requests/s" "$side" "$(report_rate <<<"$out")" "$mark"
                    if [[ $mode == with ]]; then
                        record "head-of-line" "$small: large requests done" "$side" \
                            "$(sed -nE 's/^  background: ([0-9]+) requests.*/\1/p' <<<"$out")" "$mark"
                        record "head-of-line" "$small: large p50 ms/request" "$side" \
                            "$(sed -nE 's/^  background latency: p50 ([0-9.]+) ms.*/\1/p' <<<"$out")" "$mark"
                    fi
                done
            done
        done
    done
}

scenario_idle() {
    local most=0 count i side extra status
    for count in $IDLE_COUNTS; do ((count > most)) && most=$count; done
    ulimit -n "$(ulimit -Hn)"
    if (($(ulimit -n) < most + 1000)); then
        echo "open-file limit $(ulimit -n) is too low for $most connections: raise the hard limit (ulimit -Hn)" >&2
        return 1
    fi
    extra=$(printf '[server]\nmax_connections = %s\nidle_timeout_ms = 600000\n' "$((most + 100))")
    for count in $IDLE_COUNTS; do
        for ((i = 1; i <= IDLE_REPEAT; i++)); do
            for side in "${SIDES[@]}"; do
                label "idle side=$side run $i/$IDLE_REPEAT: $count connections held $IDLE_HOLD s"
                status=0
                out=$(bench_run "$side" sqlite "" c25519 on "$extra"$'\n' idle \
                    --connections "$count" --hold-secs "$IDLE_HOLD") || status=$?
                echo "$out"
                mark=
                ((status == 0)) || { echo "(the run failed)" && mark='!'; }
                record idle "$count connections: server RSS MiB" "$side" \
                    "$(sed -nE 's/.*, ([0-9.]+) MiB after [0-9]+ s idle.*/\1/p' <<<"$out")" "$mark"
            done
        done
    done
}

# The SQLite stores of the limit and digest scenarios: enough OPks for their runs.
DEVICES_OPKS_LIMIT=$OPKS

machine_line
echo "base: $(server_of base) ($("$(server_of base)" --version 2>/dev/null || echo '?'))"
echo "new:  $(server_of new) ($("$(server_of new)" --version 2>/dev/null || echo '?'))"
echo "pinning: server on CPU ${SERVER_CPU:-any}, lime-load on CPU ${LOAD_CPU:-any}; scenarios: $SCENARIOS; $REPEAT runs per side"
for scenario in $SCENARIOS; do
    case $scenario in
    latency | limit | digest401 | many | idle) "scenario_$scenario" ;;
    *) echo "unknown scenario $scenario (latency limit digest401 many idle)" >&2 && exit 1 ;;
    esac
done

echo
echo "== summary: medians of each side's runs (* a run disturbed by other processes, ! a failed run)"
echo
echo "| scenario | figure | base | new |"
echo "|---|---|---:|---:|"
for key in "${order[@]}"; do
    row="| ${key%%|*} | ${key#*|} |"
    for side in "${SIDES[@]}"; do
        row+=" $(median_of "$key" "$side")${marks[$key|$side]:-} |"
    done
    echo "$row"
done
