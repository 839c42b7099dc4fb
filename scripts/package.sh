#!/usr/bin/env bash
# Builds the Debian and RPM packages of lime-server: the release binary, the
# packaged config (lime-server.example.toml with its data directory set to
# /var/lib/lime-server), then cargo-deb and cargo-generate-rpm, installed at pinned
# versions when missing. Prints the two package paths, one a line, on stdout.
# Usage: scripts/package.sh
# Packaging metadata: crates/lime-server/Cargo.toml; unit, maintainer scripts and
# examples: packaging/.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

log() { echo "package.sh: $*" >&2; }

# A tool at exactly its pinned version, installed with cargo when it is not.
ensure_tool() { # CRATE VERSION COMMAND
    local crate=$1 version=$2 command=$3
    if ! cargo "$command" --version 2>/dev/null | grep -qF "$version"; then
        log "installing $crate $version"
        cargo install --locked "$crate" --version "$version" >&2
    fi
}
ensure_tool cargo-deb "$CARGO_DEB_VERSION" deb
ensure_tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION" generate-rpm
# cargo-deb strips the binary with these; the RPM's copy is stripped here.
command -v objcopy >/dev/null && command -v strip >/dev/null || {
    log "installing binutils"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q binutils >&2
}

target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
staging=$target_dir/release/lime-server-package
mkdir -p "$staging"

log "building the release binary"
cargo build --release --locked -p lime-server --bin lime-server >&2

# The packaged config is the example file, generated here so that there is one
# commented config to maintain. Only the data directory changes: the package's
# service runs in /var/lib/lime-server.
example=lime-server.example.toml
data_dir_line='data_dir = "lime-data"'
grep -qxF "$data_dir_line" "$example" || {
    log "$example has no line '$data_dir_line' to point at /var/lib/lime-server"
    exit 1
}
sed -e "s|^$data_dir_line\$|# The packaged service's data directory (without a config file: \"lime-data\").\\
data_dir = \"/var/lib/lime-server\"|" \
    "$example" >"$staging/lime-server.toml"
grep -qx 'data_dir = "/var/lib/lime-server"' "$staging/lime-server.toml"
"$target_dir/release/lime-server" --config "$staging/lime-server.toml" check-config >&2

# cargo-deb strips what it packages; cargo-generate-rpm takes files as they are.
strip --strip-all -o "$staging/lime-server" "$target_dir/release/lime-server"

log "building the .deb"
cargo deb -p lime-server --no-build --strip >&2
deb=$(ls -t "$target_dir"/debian/lime-server_*.deb | head -n 1)
log "building the .rpm"
cargo generate-rpm -p crates/lime-server >&2
rpm=$(ls -t "$target_dir"/generate-rpm/lime-server-*.rpm | head -n 1)

echo "$deb"
echo "$rpm"
