#!/usr/bin/env bash
# A MariaDB Galera cluster of N nodes on one machine, on loopback, for tests and
# benchmarks (tests/common/galera.rs and tools/lime-load/run-galera-benchmarks.sh
# call it). Each node is a `mariadbd` of its own: data dir DIR/nodeI, SQL port
# GALERA_SQL_PORT+I (default 3310+I), group communication GALERA_PORT+I (default
# 4570+I), IST GALERA_PORT+10+I, SST (rsync) GALERA_PORT+20+I; all on 127.0.0.1.
# Node 1 bootstraps the cluster. The machine's own MariaDB (3306) is not touched.
#
#   galera-cluster.sh start DIR N        create and start N nodes, wait until synced
#   galera-cluster.sh stop DIR           kill every node and remove DIR
#   galera-cluster.sh status DIR         each node's wsrep state
#   galera-cluster.sh kill-node DIR I    kill -9 node I (its data dir stays)
#   galera-cluster.sh start-node DIR I   start node I again: it rejoins (IST/SST)
#
# Needs the packages mariadb-server, galera-4 and rsync. mariadbd refuses to run
# as root: started by root, the nodes run as GALERA_USER (default nobody), their
# dirs chowned.
# Failure detection is shortened for tests (evs.suspect_timeout PT2S,
# evs.inactive_timeout PT3S; Galera's defaults are PT5S and PT15S): a killed node
# leaves the cluster within about 3 s.
set -euo pipefail

sql_base=${GALERA_SQL_PORT:-3310}
group_base=${GALERA_PORT:-4570}
# mariadbd refuses to run as root: as root, the nodes run as GALERA_USER; as
# anyone else, as themselves.
if ((EUID == 0)); then run_as=${GALERA_USER:-nobody}; else run_as=$(id -un); fi
provider=/usr/lib/galera/libgalera_smm.so
# Every wait is bounded (seconds).
wait_limit=${GALERA_WAIT:-90}

usage() {
    sed -n '9,13p' "$0" >&2
    exit 2
}

node_dir() { echo "$1/node$2"; }
sql_port() { echo $((sql_base + $1)); }

# Runs SQL on node I as root over TCP; prints the answer without headers.
node_sql() {
    local dir=$1 i=$2 sql=$3
    mariadb --no-defaults --protocol=tcp -h127.0.0.1 -P"$(sql_port "$i")" -uroot \
        --connect-timeout=2 -N -B -e "$sql"
}

wsrep_status() {
    node_sql "$1" "$2" "SHOW STATUS WHERE Variable_name IN \
        ('wsrep_local_state_comment', 'wsrep_cluster_size', 'wsrep_ready')" 2>/dev/null \
        | awk '{printf "%s=%s ", $1, $2}'
}

# Waits until node I reports Synced in a cluster of `size` nodes.
wait_synced() {
    local dir=$1 i=$2 size=$3 status=""
    local deadline=$((SECONDS + wait_limit))
    while ((SECONDS < deadline)); do
        status=$(wsrep_status "$dir" "$i" || true)
        if [[ $status == *"wsrep_local_state_comment=Synced"* &&
              $status == *"wsrep_cluster_size=$size "* ]]; then
            return 0
        fi
        if ! kill -0 "$(cat "$(node_dir "$dir" "$i")/mariadbd.pid" 2>/dev/null || echo 0)" \
            2>/dev/null; then
            echo "galera-cluster.sh: node $i exited; its log:" >&2
            tail -n 30 "$(node_dir "$dir" "$i")/error.log" >&2 || true
            return 1
        fi
        sleep 0.5
    done
    echo "galera-cluster.sh: node $i not synced within ${wait_limit}s ($status)" >&2
    tail -n 30 "$(node_dir "$dir" "$i")/error.log" >&2 || true
    return 1
}

write_config() {
    local dir=$1 i=$2 n=$3 node addresses="" j
    node=$(node_dir "$dir" "$i")
    for ((j = 1; j <= n; j++)); do
        addresses+="${addresses:+,}127.0.0.1:$((group_base + j))"
    done
    cat >"$node/my.cnf" <<EOF
[mariadbd]
user = $run_as
datadir = $node/data
socket = $node/mariadbd.sock
pid-file = $node/mariadbd.pid
log-error = $node/error.log
bind-address = 127.0.0.1
port = $(sql_port "$i")
skip-log-bin
performance_schema = OFF
innodb_buffer_pool_size = 32M
innodb_log_file_size = 16M
innodb_flush_log_at_trx_commit = 2
max_connections = 300
binlog_format = ROW
default_storage_engine = InnoDB
innodb_autoinc_lock_mode = 2
wsrep_on = ON
wsrep_provider = $provider
wsrep_cluster_name = lime_test
wsrep_cluster_address = gcomm://$addresses
wsrep_node_name = node$i
wsrep_node_address = 127.0.0.1:$((group_base + i))
wsrep_node_incoming_address = 127.0.0.1:$(sql_port "$i")
wsrep_sst_method = rsync
wsrep_sst_receive_address = 127.0.0.1:$((group_base + 20 + i))
wsrep_provider_options = "gmcast.listen_addr=tcp://127.0.0.1:$((group_base + i));ist.recv_addr=127.0.0.1:$((group_base + 10 + i));gcache.size=32M;evs.suspect_timeout=PT2S;evs.inactive_timeout=PT3S;evs.inactive_check_period=PT0.5S;evs.keepalive_period=PT0.5S"
EOF
}

# Starts node I in the background (bootstrapping when `new` is set).
launch() {
    local dir=$1 i=$2 new=${3:-} node
    node=$(node_dir "$dir" "$i")
    # Started with setsid so that the caller's process group (a test) can be
    # killed without taking the nodes along, and vice versa; `stop` ends them.
    setsid mariadbd --defaults-file="$node/my.cnf" ${new:+--wsrep-new-cluster} \
        </dev/null >>"$node/stdout.log" 2>&1 &
    # The pid file is written by mariadbd once it runs; keep ours meanwhile.
    echo $! >"$node/launched.pid"
    local deadline=$((SECONDS + wait_limit))
    until [[ -s $node/mariadbd.pid ]]; do
        if ((SECONDS >= deadline)) || ! kill -0 "$(cat "$node/launched.pid")" 2>/dev/null; then
            echo "galera-cluster.sh: node $i did not start; its log:" >&2
            tail -n 30 "$node/error.log" "$node/stdout.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

start() {
    local dir=$1 n=$2 i node
    mkdir -p "$dir"
    for ((i = 1; i <= n; i++)); do
        node=$(node_dir "$dir" "$i")
        mkdir -p "$node/data"
        write_config "$dir" "$i" "$n"
        mariadb-install-db --defaults-file="$node/my.cnf" --auth-root-authentication-method=normal \
            --skip-test-db >"$node/install.log" 2>&1 \
            || { cat "$node/install.log" >&2; return 1; }
    done
    chown -R "$run_as" "$dir"
    launch "$dir" 1 new
    wait_synced "$dir" 1 1
    for ((i = 2; i <= n; i++)); do
        launch "$dir" "$i"
    done
    for ((i = 1; i <= n; i++)); do
        wait_synced "$dir" "$i" "$n"
    done
}

node_pid() {
    local node
    node=$(node_dir "$1" "$2")
    cat "$node/mariadbd.pid" 2>/dev/null || cat "$node/launched.pid" 2>/dev/null || true
}

kill_node() {
    local dir=$1 i=$2 pid
    pid=$(node_pid "$dir" "$i")
    [[ -n $pid ]] && kill -9 "$pid" 2>/dev/null || true
    local node
    node=$(node_dir "$dir" "$i")
    rm -f "$node/mariadbd.pid" "$node/launched.pid"
}

start_node() {
    local dir=$1 i=$2 n
    n=$(find "$dir" -maxdepth 1 -name 'node*' -type d | wc -l)
    launch "$dir" "$i"
    wait_synced "$dir" "$i" "$n"
}

stop() {
    local dir=$1 node pids=() pid
    [[ -d $dir ]] || return 0
    for node in "$dir"/node*; do
        [[ -d $node ]] || continue
        pid=$(node_pid "$dir" "${node##*/node}")
        [[ -n $pid ]] && pids+=("$pid")
        kill_node "$dir" "${node##*/node}"
    done
    # Wait (bounded) for them to be gone, so that their ports are free.
    local deadline=$((SECONDS + 10))
    for pid in "${pids[@]}"; do
        while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do
            sleep 0.2
        done
    done
    rm -rf "$dir"
}

status() {
    local dir=$1 node
    for node in "$dir"/node*; do
        [[ -d $node ]] || continue
        echo "node${node##*/node}: $(wsrep_status "$dir" "${node##*/node}" || echo down)"
    done
}

(($# >= 2)) || usage
command=$1 dir=$2
case $command in
start) (($# == 3)) || usage; start "$dir" "$3" ;;
stop) stop "$dir" ;;
status) status "$dir" ;;
kill-node) (($# == 3)) || usage; kill_node "$dir" "$3" ;;
start-node) (($# == 3)) || usage; start_node "$dir" "$3" ;;
*) usage ;;
esac
