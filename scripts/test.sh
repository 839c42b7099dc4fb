#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# (the real liblime client, for the interop test) and runs every test of the
# workspace. Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# liblime-dev: the real client's C API (lime_ffi.h, liblime.so) for the interop test.
# libsoci-sqlite3-4.0: liblime keeps its local keys through SOCI's sqlite3 backend,
# which liblime0 does not pull in by itself.
needed=(liblime-dev libsoci-sqlite3-4.0)
missing=()
for package in "${needed[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "test.sh: installing ${missing[*]}" >&2
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}"
fi

cargo test --workspace --locked "$@"
