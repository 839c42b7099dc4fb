#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need,
# starts the local MariaDB and PostgreSQL when they are installed but stopped, runs
# every test of the workspace (stores on SQLite) and, beside it, the black-box
# suites and the liblime interop test again on MariaDB and on PostgreSQL.
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

# liblime-dev: the real client's C API (lime_ffi.h, liblime.so) for the interop test.
# libsoci-sqlite3-4.0: liblime keeps its local keys through SOCI's sqlite3 backend,
# which liblime0 does not pull in by itself.
# curl: a real HTTP Digest client for the authentication tests.
# prometheus: its promtool checks the metrics scrape (tests/metrics.rs). Debian
# ships promtool only in this package, beside the Prometheus server (whose unit
# the package enables; the tests use none of its ports). Recommended packages are
# left out: they would add prometheus-node-exporter, another daemon.
# liblinphone-dev, linphone-common, pkg-config, python3: Linphone's own stack
# end to end (tests/linphone_*.rs): the harness compiles a small C driver against
# liblinphone (pkg-config finds its flags); liblinphone aborts on parsing an
# address without the belr grammars (identity_grammar, cpim_grammar) that only
# linphone-common ships; the loopback SIP registrar is a Python script.
# mariadb-server, galera-4, rsync: tests/galera.rs runs a 3-node Galera cluster
# on loopback (scripts/galera-cluster.sh: SQL ports 3311-3313, group
# communication 4571-4573, IST 4581-4583, rsync SST 4591-4593, or the next free
# block 30 ports up; about a minute).
needed=(liblime-dev libsoci-sqlite3-4.0 curl prometheus
    liblinphone-dev linphone-common pkg-config python3
    mariadb-server galera-4 rsync)
missing=()
for package in "${needed[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "test.sh: installing ${missing[*]}" >&2
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q \
        --no-install-recommends "${missing[@]}"
fi

# The database servers the store tests use: 127.0.0.1:3306 (root, no password) and
# 127.0.0.1:5432 (postgres, trust), started here when installed but stopped.
wait_for() { # NAME COMMAND...: up to 30 s for COMMAND to succeed
    local name=$1; shift
    for _ in $(seq 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "test.sh: $name did not come up" >&2
    return 1
}
if ! mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    echo "test.sh: starting MariaDB" >&2
    "${sudo_cmd[@]}" start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for MariaDB mysqladmin -h 127.0.0.1 -u root ping
fi
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    echo "test.sh: starting PostgreSQL" >&2
    "${sudo_cmd[@]}" pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432
fi

# The packages (scripts/test-packages.sh: built, the .deb installed and served
# from as the service would run it, upgraded, removed and purged), in the
# background from here: their release build has a target directory of its own, so
# it runs while the suites below wait on servers, databases and clocks, at the
# lowest CPU priority so that it never slows what they time. Its output is shown
# at the end.
package_log=target/test-packages.log
mkdir -p target
echo "test.sh: packages, in the background (log: $package_log)" >&2
# In a process group of its own (job control on for this one job), so that all
# of it, its build included, can be stopped.
set -m
"${sudo_cmd[@]}" nice -n 19 env CARGO_TARGET_DIR="$PWD/target/package" \
    scripts/test-packages.sh >"$package_log" 2>&1 &
package_pid=$!
set +m
# Never leave it running, its build included, if a suite fails first.
trap 'kill -TERM -- "-$package_pid" 2>/dev/null || true' EXIT

# Every test is built once; then three suites run side by side, as most of
# their time is spent waiting on servers, databases and clocks: every test of the
# workspace (stores on SQLite, through cargo, with the extra arguments), and the
# same black-box code again on MariaDB and on PostgreSQL (the test binaries run
# directly: cargo would make them wait on its lock of the target directory).
binaries=target/test-binaries.tsv
cargo test --workspace --locked --no-run --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["profile"]["test"] and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"], sep="\t")' >"$binaries"

# The integration tests of lime-server, in turn, as cargo would run them (from
# the package's directory), with the variables given before the names.
run_tests() { # [VAR=VALUE...] NAME...
    local vars=()
    while [[ $# -gt 0 && $1 == *=* ]]; do vars+=("$1"); shift; done
    local name exe
    for name in "$@"; do
        exe=$(awk -F'\t' -v name="$name" '$1 == name { print $2 }' "$binaries")
        [ -n "$exe" ] || { echo "test.sh: no test binary named $name" >&2; return 1; }
        echo "test.sh: $name ${vars[*]}"
        (cd crates/lime-server && env "${vars[@]}" "$exe") || return 1
    done
}
black_box=(protocol bad_input concurrency limits liblime_interop federation linphone_chat)
# The black-box suites on each database server; the real client again with
# authentication on: answering digest challenges (accounts on MariaDB), then
# presenting client certificates.
on_mariadb() {
    run_tests LIME_TEST_BACKEND=mariadb "${black_box[@]}" &&
        run_tests LIME_TEST_AUTH=digest LIME_TEST_BACKEND=mariadb liblime_interop
}
on_postgres() {
    run_tests LIME_TEST_BACKEND=postgres "${black_box[@]}" &&
        run_tests LIME_TEST_AUTH=certificate liblime_interop
}
mkdir -p target/test-logs
suites=(on_mariadb on_postgres)
suite_pids=()
for suite in "${suites[@]}"; do
    echo "test.sh: $suite, in the background (log: target/test-logs/$suite.log)" >&2
    (started=$SECONDS; status=0; "$suite" || status=$?
        echo "test.sh: $suite ended with status $status in $((SECONDS - started)) s"
        exit "$status") >"target/test-logs/$suite.log" 2>&1 &
    suite_pids+=($!)
done
trap 'kill -TERM -- "-$package_pid" 2>/dev/null || true; kill "${suite_pids[@]}" 2>/dev/null || true' EXIT

started=$SECONDS
cargo test --workspace --locked "$@"
echo "test.sh: the workspace's tests passed in $((SECONDS - started)) s" >&2

failed=()
for i in "${!suite_pids[@]}"; do
    suite=${suites[$i]}
    wait "${suite_pids[$i]}" || failed+=("$suite")
    cat "target/test-logs/$suite.log"
done
if ((${#failed[@]})); then
    echo "test.sh: failed: ${failed[*]} (logs above, and in target/test-logs/)" >&2
    exit 1
fi

echo "test.sh: waiting for the package test" >&2
package_status=0
wait "$package_pid" || package_status=$?
trap - EXIT
cat "$package_log"
if ((package_status != 0)); then
    echo "test.sh: the package test failed (exit $package_status)" >&2
    exit "$package_status"
fi
