#!/usr/bin/env bash
# Tests the packages on this machine (Debian, as root; systemd need not run):
# builds the .deb and the .rpm (scripts/package.sh), installs the .deb with dpkg,
# checks its files, owners and modes, runs the installed binary as the lime-server
# user with the installed config (registerUser + getPeerBundle over HTTPS, and
# the systemd READY/STOPPING notifications), checks that reinstalling keeps an
# edited config, verifies the unit, removes the package (the data directory stays),
# purges it (it goes), and reads the RPM (files, modes, config files, license,
# scriptlets). Leaves the machine as it found it, also on failure.
# Usage: scripts/test-packages.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { echo "test-packages.sh: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg -i, runuser)"
installed() { dpkg-query -W -f='${Status}' lime-server 2>/dev/null | grep -qv "not-installed"; }
if installed; then
    fail "a lime-server package is already installed here: this test would replace it"
fi
user_existed=false
getent passwd lime-server >/dev/null && user_existed=true
[ -e /var/lib/lime-server ] && fail "/var/lib/lime-server exists already: this test would delete it"

# What the checks use: rpm to read the RPM, curl as the client, python3 to build
# and compare X3DH messages, readelf to see that the binary is stripped.
needed=(rpm curl python3 binutils)
missing=()
for package in "${needed[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

work=$(mktemp -d)
server_pid=
listener_pid=
cleanup() {
    local status=$?
    local pid
    for pid in $server_pid $listener_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if installed; then
        dpkg --purge lime-server >/dev/null 2>&1 || log "could not purge lime-server"
    fi
    if ! $user_existed && getent passwd lime-server >/dev/null; then
        deluser --system --quiet lime-server >/dev/null 2>&1 || true
        delgroup --system --quiet lime-server >/dev/null 2>&1 || true
    fi
    rm -rf "$work" /var/lib/lime-server
    ((status == 0)) || log "failed (exit status $status); the machine is cleaned up"
    exit "$status"
}
trap cleanup EXIT
# Stopped by test.sh (a suite failed): clean up all the same.
trap 'exit 143' TERM INT

# check_path PATH OWNER:GROUP MODE
check_path() {
    [ -e "$1" ] || fail "$1 is missing"
    local got
    got=$(stat -c '%U:%G %a' "$1")
    [ "$got" = "$2 $3" ] || fail "$1 is $got, not $2 $3"
}

started=$(date +%s)
mapfile -t packages < <(scripts/package.sh)
deb=${packages[0]:-}
rpm_file=${packages[1]:-}
[ -f "$deb" ] && [ -f "$rpm_file" ] || fail "scripts/package.sh made no packages"
log "built in $(($(date +%s) - started)) s: $(du -h "$deb" | cut -f1) $deb, $(du -h "$rpm_file" | cut -f1) $rpm_file"

log "dpkg -i $(basename "$deb")"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" </dev/null

config=/etc/lime-server/lime-server.toml
check_path /usr/bin/lime-server root:root 755
# (Each command's output is kept before grep -q reads it: grep stopping early
# would end the command with SIGPIPE, a failure under pipefail.)
sections=$(readelf -S /usr/bin/lime-server)
grep -q '\.symtab' <<<"$sections" && fail "/usr/bin/lime-server is not stripped"
check_path "$config" root:root 644
grep -qx 'data_dir = "/var/lib/lime-server"' "$config" || fail "$config does not use /var/lib/lime-server"
conffiles=$(dpkg-query -W -f='${Conffiles}' lime-server)
grep -q " $config " <<<"$conffiles" || fail "$config is not a conffile"
check_path /etc/logrotate.d/lime-server root:root 644
check_path /usr/lib/systemd/system/lime-server.service root:root 644
check_path /usr/share/doc/lime-server/copyright root:root 644
grep -q "GNU GENERAL PUBLIC LICENSE" /usr/share/doc/lime-server/copyright \
    || fail "the copyright file does not carry the license"
for doc in README.md operators.md migrating-from-php.md protocol.md; do
    ls /usr/share/doc/lime-server/"$doc"* >/dev/null 2>&1 || fail "/usr/share/doc/lime-server/$doc is missing"
done
for example in lime-server.example.toml nginx-lime-server.conf apache-lime-server.conf; do
    [ -e /usr/share/doc/lime-server/examples/"$example" ] || fail "example $example is missing"
done
getent passwd lime-server | awk -F: '$3 >= 1000 { exit 1 } $7 !~ /nologin|false/ { exit 1 }' \
    || fail "lime-server is not a system user without a login shell: $(getent passwd lime-server)"
check_path /var/lib/lime-server lime-server:lime-server 750
[ -L /etc/systemd/system/multi-user.target.wants/lime-server.service ] \
    || fail "the unit was not enabled on install"

log "systemd-analyze verify"
systemd-analyze verify /usr/lib/systemd/system/lime-server.service

# The installed binary, as the service runs it (systemd is not PID 1 here): the
# lime-server user, the installed config, and a notification socket standing in
# for systemd's.
log "serving as lime-server with $config"
chmod 755 "$work"
python3 - "$work/notify" "$work/notifications" <<'PY' &
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
sock.settimeout(120)
with open(sys.argv[2], "a") as out:
    while True:
        message = sock.recv(4096).decode()
        out.write(message + "\n")
        out.flush()
        if "STOPPING=1" in message:
            break
PY
listener_pid=$!
for _ in $(seq 50); do [ -S "$work/notify" ] && break; sleep 0.1; done
# setpriv execs (runuser would fork): the process started is the server itself.
(cd / && exec setpriv --reuid=lime-server --regid=lime-server --init-groups \
    env NOTIFY_SOCKET="$work/notify" /usr/bin/lime-server --config "$config" serve) \
    >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 600); do
    grep -qx "READY=1" "$work/notifications" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server stopped"; }
    sleep 0.1
done
grep -qx "READY=1" "$work/notifications" 2>/dev/null \
    || { cat "$work/server.log" >&2; fail "no READY=1 within 60 s"; }
grep -q "authentication is OFF" "$work/server.log" || fail "no warning that authentication is off"
for made in tls/self-signed.key lime-c25519.sqlite3; do
    owner=$(stat -c %U:%G "/var/lib/lime-server/$made")
    [ "$owner" = lime-server:lime-server ] || fail "/var/lib/lime-server/$made belongs to $owner"
done

messages="$repo/scripts/x3dh-messages.py"
post() { # DEVICE_ID REQUEST ANSWER
    curl -sS --fail --max-time 10 --cacert /var/lib/lime-server/tls/self-signed.crt \
        --resolve localhost:25519:127.0.0.1 -H 'Content-Type: x3dh/octet-stream' \
        -H "X-Lime-user-identity: $1" --data-binary @"$2" -o "$3" https://localhost:25519/
}
alice='sip:alice@example.org;gr=urn:uuid:00000000-0000-0000-0000-00000000a11c'
bob='sip:bob@example.org;gr=urn:uuid:00000000-0000-0000-0000-000000000b0b'
"$messages" register "$alice" 16 "$work/register-alice"
"$messages" register "$bob" 32 "$work/register-bob"
"$messages" get-bundle "$alice" "$work/get-alice"
post "$alice" "$work/register-alice" "$work/answer-1"
"$messages" expect-registered "$work/answer-1"
post "$bob" "$work/register-bob" "$work/answer-2"
"$messages" expect-registered "$work/answer-2"
post "$bob" "$work/get-alice" "$work/answer-3"
"$messages" expect-bundle "$alice" 16 1 "$work/answer-3"
# Alice's only one-time pre-key was served: the next bundle has none.
post "$bob" "$work/get-alice" "$work/answer-4"
"$messages" expect-bundle "$alice" 16 0 "$work/answer-4"
log "registerUser and getPeerBundle answered as expected"

# systemctl reload: the unit sends SIGHUP; the server reloads and goes on.
grep -qx 'ExecReload=/bin/kill -HUP $MAINPID' /usr/lib/systemd/system/lime-server.service \
    || fail "the unit has no ExecReload sending SIGHUP"
kill -HUP "$server_pid"
for _ in $(seq 100); do
    [ "$(grep -cx "READY=1" "$work/notifications")" -ge 2 ] && break
    sleep 0.1
done
grep -qx "RELOADING=1" "$work/notifications" || fail "no RELOADING=1 on SIGHUP"
[ "$(grep -cx "READY=1" "$work/notifications")" -ge 2 ] || fail "no READY=1 after the reload"
kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "SIGHUP ended the server"; }
grep -q "TLS reloaded" "$work/server.log" || fail "no 'TLS reloaded' line after SIGHUP"
post "$bob" "$work/get-alice" "$work/answer-5"
"$messages" expect-bundle "$alice" 16 0 "$work/answer-5"
log "SIGHUP reloaded, the server still answers"

/usr/bin/lime-server probe https://localhost:25519/ --user probe@example.org \
    --ca /var/lib/lime-server/tls/self-signed.crt >"$work/probe.log" 2>&1 \
    || { cat "$work/probe.log" >&2; fail "lime-server probe failed against the installed server"; }
grep -q "^OK: " "$work/probe.log" || fail "no OK verdict from lime-server probe"
log "lime-server probe passed"

kill -TERM "$server_pid"
wait "$server_pid" || fail "the server exited with status $? on SIGTERM"
server_pid=
wait "$listener_pid" || true
listener_pid=
grep -qx "STOPPING=1" "$work/notifications" || fail "no STOPPING=1 on SIGTERM"

log "reinstalling over an edited config"
sed -i 's/^max_body_bytes = 1048576$/max_body_bytes = 2097152/' "$config"
grep -qx 'max_body_bytes = 2097152' "$config" || fail "could not edit $config"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" </dev/null
grep -qx 'max_body_bytes = 2097152' "$config" || fail "reinstalling overwrote the edit of $config"
[ ! -e "$config.dpkg-new" ] && [ ! -e "$config.dpkg-dist" ] || fail "dpkg left a new config beside $config"

log "dpkg -r: the data directory and the config stay"
dpkg --remove lime-server
[ ! -e /usr/bin/lime-server ] || fail "/usr/bin/lime-server is still there after dpkg -r"
[ -f /var/lib/lime-server/lime-c25519.sqlite3 ] || fail "dpkg -r deleted the databases"
[ -f "$config" ] || fail "dpkg -r deleted $config"
getent passwd lime-server >/dev/null || fail "dpkg -r deleted the lime-server user"

log "dpkg -P: the data directory and the config go"
dpkg --purge lime-server
[ ! -e /var/lib/lime-server ] || fail "/var/lib/lime-server is still there after dpkg -P"
[ ! -e "$config" ] || fail "$config is still there after dpkg -P"
[ ! -e /etc/systemd/system/multi-user.target.wants/lime-server.service ] \
    || fail "the unit is still enabled after dpkg -P"

log "rpm -qp $(basename "$rpm_file")"
# rpm queries with its database in $work: Debian's rpm would make ~/.rpmdb.
rpmq() { rpm --dbpath "$work/rpmdb" -qp "$@" "$rpm_file" 2>/dev/null; }
rpmq -l >"$work/rpm-files"
cat "$work/rpm-files" >&2
for path in /usr/bin/lime-server /etc/lime-server "$config" \
    /usr/lib/systemd/system/lime-server.service /etc/logrotate.d/lime-server \
    /usr/share/licenses/lime-server/LICENSE /usr/share/doc/lime-server/operators.md \
    /usr/share/doc/lime-server/examples/lime-server.example.toml; do
    grep -qx "$path" "$work/rpm-files" || fail "the RPM lacks $path"
done
# Mode, owner and group of each file, as rpm would install them.
rpm_modes=$(rpmq --queryformat '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]')
for expected in "-rwxr-xr-x root:root /usr/bin/lime-server" \
    "drwxr-xr-x root:root /etc/lime-server" \
    "-rw-r--r-- root:root $config" \
    "-rw-r--r-- root:root /usr/lib/systemd/system/lime-server.service"; do
    grep -qxF -- "$expected" <<<"$rpm_modes" \
        || fail "the RPM does not hold '$expected': $(grep -F "${expected##* }" <<<"$rpm_modes")"
done
rpm_licenses=$(rpmq --licensefiles)
grep -qx /usr/share/licenses/lime-server/LICENSE <<<"$rpm_licenses" \
    || fail "the RPM does not mark its LICENSE as %license"
rpm_config=$(rpmq --configfiles)
for path in "$config" /etc/logrotate.d/lime-server; do
    grep -qx "$path" <<<"$rpm_config" || fail "$path is not a config file of the RPM"
done
# %config(noreplace): the flag shows as "n" in the file flags (%{FILEFLAGS:fflags}).
rpm_flags=$(rpmq --queryformat '[%{FILEFLAGS:fflags} %{FILENAMES}\n]')
grep -qx "cn $config" <<<"$rpm_flags" || fail "$config is not %config(noreplace): $(grep -F "$config" <<<"$rpm_flags")"
rpm_scripts=$(rpmq --scripts)
for needed_line in "useradd --system" "install -d -o lime-server -g lime-server -m 0750 /var/lib/lime-server"; do
    grep -qF -- "$needed_line" <<<"$rpm_scripts" || fail "the RPM's scriptlets lack '$needed_line'"
done
# As usual on RPM systems, installing neither enables nor starts the service (the
# comments, which tell how to, aside).
rpm_commands=$(grep -v '^[[:space:]]*#' <<<"$rpm_scripts")
grep -Eq 'systemctl (.* )?(enable|start|preset)( |$)' <<<"$rpm_commands" \
    && fail "the RPM's scriptlets enable or start the service: $rpm_commands"

log "passed in $(($(date +%s) - started)) s"
