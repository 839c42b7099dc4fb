# Shell functions shared by the run-*-benchmarks.sh scripts (sourced, not run):
# seeding and copying stores, starting and stopping a server, reading lime-load's
# reports, retrying runs that other processes disturbed, medians.
# shellcheck shell=bash
# shellcheck disable=SC2034 # out and mark: measure's results, for the caller

# Fails unless directory $1 holds the executables named by the other arguments.
require_tools() {
    local dir=$1 tool
    shift
    for tool in "$@"; do
        [[ -x $dir/$tool ]] || {
            echo "$dir/$tool missing: cargo build --release -p lime-server -p lime-load" >&2
            exit 1
        }
    done
}

# The machine, for the top of a report.
machine_line() {
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%FT%TZ)"
}

# seed_template LIME_LOAD DIR CURVE DEVICES OPKS: DIR/lime-CURVE.sqlite3 with DEVICES
# seeded devices of OPKS one-time keys each, unless it is there already.
seed_template() {
    local lime_load=$1 dir=$2 curve=$3 devices=$4 opks=$5
    [[ -f $dir/lime-$curve.sqlite3 ]] && return
    rm -f "$dir/lime-$curve.sqlite3"*
    "$lime_load" seed --data-dir "$dir" --curve "$curve" --devices "$devices" \
        --opks-per-device "$opks"
}

# fresh_copy TEMPLATE_DIR RUN_DIR: RUN_DIR emptied, with a copy of the template's
# stores, so every run starts from the same data; flushed to disk first, or the
# run's first fsync would pay for writing the whole copy.
fresh_copy() {
    local template=$1 run=$2
    rm -rf "$run"
    mkdir -p "$run"
    cp "$template"/lime-*.sqlite3 "$run/"
    sync "$run"/lime-*.sqlite3
}

# The local database servers (MariaDB 127.0.0.1:3306 root, PostgreSQL
# 127.0.0.1:5432 postgres, trust). db_url BACKEND NAME: the store URL of database
# NAME_{curve} (the server replaces {curve}).
db_url() {
    case $1 in
    mariadb) echo "mysql://root@127.0.0.1:3306/$2_{curve}" ;;
    postgres) echo "postgres://postgres@127.0.0.1:5432/$2_{curve}" ;;
    *) echo "unknown database backend $1 (mariadb or postgres)" >&2 && return 1 ;;
    esac
}

# db_server_pid PORT: the process listening on local TCP port PORT.
db_server_pid() {
    ss -Hltnp "sport = :$1" | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -1
}

# db_sql BACKEND SQL...: statements run on the server's administrative database.
db_sql() {
    local backend=$1 statement
    shift
    for statement in "$@"; do
        case $backend in
        mariadb) mysql -h 127.0.0.1 -u root -e "$statement" ;;
        postgres) psql -q -h 127.0.0.1 -U postgres -d postgres -c "$statement" ;;
        esac
    done
}

# drop_db BACKEND DATABASE
drop_db() {
    case $1 in
    mariadb) db_sql mariadb "DROP DATABASE IF EXISTS $2" ;;
    postgres) db_sql postgres "DROP DATABASE IF EXISTS $2 WITH (FORCE)" ;;
    esac
}

# recreate_db BACKEND DATABASE: an empty database of that name.
recreate_db() {
    drop_db "$1" "$2"
    db_sql "$1" "CREATE DATABASE $2"
}

# seed_db LIME_LOAD BACKEND NAME CURVE DEVICES OPKS: database NAME_CURVE recreated
# and seeded with lime-load seed-db; MariaDB's statistics refreshed after the bulk
# load (see docs/benchmarks-databases.md).
seed_db() {
    local lime_load=$1 backend=$2 name=$3 curve=$4 devices=$5 opks=$6
    recreate_db "$backend" "${name}_$curve"
    "$lime_load" seed-db --store "$(db_url "$backend" "$name")" --curve "$curve" \
        --devices "$devices" --opks-per-device "$opks" 2>&1 | { grep -v retrying || true; }
    if [[ $backend == mariadb ]]; then
        mysql -h 127.0.0.1 -u root "${name}_$curve" -e "ANALYZE TABLE Users, OPk" >/dev/null
    fi
}

# settle_mariadb: until InnoDB has written the pages the last load dirtied (60 s at
# most), so that a run does not pay for the copy before it: a loaded copy leaves
# most of the default 128 MiB buffer pool dirty, flushed in the background while
# the next run goes on (MariaDB's runs then varied by a factor of two).
settle_mariadb() {
    local saved dirty _
    saved=$(mysql -h 127.0.0.1 -u root -N -e "SELECT @@GLOBAL.innodb_max_dirty_pages_pct")
    mysql -h 127.0.0.1 -u root -e "SET GLOBAL innodb_max_dirty_pages_pct = 0"
    for _ in $(seq 600); do
        dirty=$(mysql -h 127.0.0.1 -u root -N -e \
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
             WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_DIRTY'")
        ((dirty < 100)) && break
        sleep 0.1
    done
    mysql -h 127.0.0.1 -u root -e "SET GLOBAL innodb_max_dirty_pages_pct = $saved"
}

# copy_db BACKEND FROM TO: database TO recreated as a copy of FROM (PostgreSQL:
# from it as a template; MariaDB: a dump of it loaded).
copy_db() {
    local backend=$1 from=$2 to=$3
    case $backend in
    mariadb)
        recreate_db mariadb "$to"
        mysqldump -h 127.0.0.1 -u root --single-transaction "$from" | mysql -h 127.0.0.1 -u root "$to"
        mysql -h 127.0.0.1 -u root "$to" -e "ANALYZE TABLE Users, OPk" >/dev/null
        settle_mariadb
        ;;
    postgres)
        drop_db postgres "$to"
        db_sql postgres "CREATE DATABASE $to TEMPLATE $from"
        ;;
    esac
}

# The account load-client@example.org (password load-password) in a
# flexisip-account-manager-shaped database, both hashes: make_accounts SQLITE_FILE
# MARIADB_DATABASE creates both (an empty MARIADB_DATABASE: SQLite only).
ACCOUNT_USER=load-client
ACCOUNT_DOMAIN=example.org
ACCOUNT_PASSWORD=load-password
# shellcheck disable=SC2034 # for the scripts that source this file
ACCOUNT_SENDER="sip:$ACCOUNT_USER@$ACCOUNT_DOMAIN;gr=urn:uuid:00000000-0000-0000-0000-ffffffffffff"
make_accounts() {
    local sqlite_file=$1 mariadb_database=$2 sql
    ha1() { printf '%s' "$ACCOUNT_USER:$ACCOUNT_DOMAIN:$ACCOUNT_PASSWORD" | "$1" | cut -d' ' -f1; }
    sql="CREATE TABLE accounts (id INTEGER PRIMARY KEY, username VARCHAR(64) NOT NULL,
  domain VARCHAR(64) NOT NULL, UNIQUE (username, domain));
CREATE TABLE passwords (id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL,
  password VARCHAR(255) NOT NULL, algorithm VARCHAR(10) NOT NULL, UNIQUE (account_id, algorithm));
INSERT INTO accounts (id, username, domain) VALUES (1, '$ACCOUNT_USER', '$ACCOUNT_DOMAIN');
INSERT INTO passwords (id, account_id, password, algorithm) VALUES
  (1, 1, '$(ha1 md5sum)', 'MD5'), (2, 1, '$(ha1 sha256sum)', 'SHA-256');"
    rm -f "$sqlite_file"
    python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).executescript(sys.argv[2])' \
        "$sqlite_file" "$sql"
    if [[ -n $mariadb_database ]]; then
        recreate_db mariadb "$mariadb_database"
        mysql -h 127.0.0.1 -u root "$mariadb_database" -e "$sql"
    fi
}

# A digest nonce secret in file $1.
make_nonce_secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$1"; }

# wait_for_health SCHEME PORT: until the server answers /health (10 s at most).
wait_for_health() {
    local _
    for _ in $(seq 100); do
        curl -skf "$1://127.0.0.1:$2/health" >/dev/null && return 0
        sleep 0.1
    done
    echo "no server answering on port $2" >&2
    return 1
}

# start_server LIME_SERVER CONFIG SCHEME PORT LOG [serve options...]: the server in
# the background, its pid in $server_pid, once it answers /health. With
# SERVER_CPU set, it runs on that CPU only (taskset). What the machine has yet to
# write goes to disk first (a build's output, an earlier run's files): the kernel
# would write it back 30 s after it was written (vm.dirty_expire_centisecs),
# whatever runs then, and a run across that moment after a release build
# stalled for about 100 ms (docs/benchmarks.md).
server_pid=
start_server() {
    local lime_server=$1 config=$2 scheme=$3 port=$4 log=$5 pin=()
    shift 5
    sync
    [[ -n ${SERVER_CPU:-} ]] && pin=(taskset -c "$SERVER_CPU")
    [[ $scheme == http ]] && set -- "$@" --plain-http
    "${pin[@]}" "$lime_server" --config "$config" serve --listen "127.0.0.1:$port" "$@" \
        2>>"$log" &
    server_pid=$!
    wait_for_health "$scheme" "$port"
}

stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}

# Figures out of lime-load's report (on stdin).
other_cpu() { sed -nE 's/.*other processes ([0-9.]+) s CPU.*/\1/p' | head -1; }
report_rate() { sed -nE 's/.*rate: ([0-9.]+) (requests|claims).*/\1/p' | head -1; }
report_server_cpu() { sed -nE 's/.*server CPU: ([0-9.]+) ms.request.*/\1/p' | head -1; }
report_db_cpu() { sed -nE 's/.*database CPU: ([0-9.]+) ms.request.*/\1/p' | head -1; }
# report_latency NAME: p50, p90, p99, p99.9 or max of the timed requests, in ms.
report_latency() { sed -nE "s/^  latency:.*[ ,]$1 ([0-9.]+) ms.*/\\1/p" | head -1; }

# Whether a report says other processes stayed under MAX_OTHERS CPU seconds.
quiet() { awk -v max="${MAX_OTHERS:-0.5}" '{ exit !($1 <= max) }' <<<"$(other_cpu <<<"$1")"; }

# The median of the numbers on stdin (a trailing * is ignored).
median() { tr -d '*' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# measure COMMAND...: runs the command (a function printing lime-load's report)
# until other processes stay quiet during it, at most MAX_ATTEMPTS (5) times; leaves
# the report in $out, and "*" in $mark when it never was quiet ("!" when the
# command failed: not run again).
measure() {
    local attempt
    for ((attempt = 1; attempt <= ${MAX_ATTEMPTS:-5}; attempt++)); do
        if ! out=$("$@"); then
            echo "$out"
            echo "(the run failed)"
            mark='!'
            return 0
        fi
        echo "$out"
        mark=
        quiet "$out" && return
        mark='*'
        echo "(other processes were busy during attempt $attempt)"
        if ((attempt < ${MAX_ATTEMPTS:-5})); then
            echo "(run again in 10 s)"
            sleep 10
        fi
    done
}
