#!/usr/bin/env bash
# Builds the Debian and RPM packages of lime-server: the release binary, the
# packaged config (lime-server.example.toml with its data directory set to
# /var/lib/lime-server), then the .deb with cargo-deb (installed at a pinned version
# when missing) and the .rpm with rpmbuild (Debian's package rpm, installed with
# apt-get when missing; a binary-only spec: no second build, and no cargo install
# of an RPM writer, which takes half an hour on a small machine). Everything is
# written in the target directory. Prints the two package paths, one a line, on
# stdout.
# Usage: scripts/package.sh
# Packaging metadata: crates/lime-server/Cargo.toml (.deb) and
# packaging/rpm/lime-server.spec (.rpm); unit, maintainer scripts and examples:
# packaging/.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

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
# cargo-deb strips the binary with objcopy and strip (binutils); the RPM's copy is
# stripped here. rpmbuild is in Debian's package rpm.
missing=()
command -v objcopy >/dev/null && command -v strip >/dev/null || missing+=(binutils)
command -v rpmbuild >/dev/null || missing+=(rpm)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

metadata=$(cargo metadata --format-version 1 --no-deps --locked)
target_dir=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$metadata")
version=$(python3 -c 'import json, sys
print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "lime-server"))' <<<"$metadata")
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

# cargo-deb strips what it packages; the RPM's spec takes the binary as it is.
strip --strip-all -o "$staging/lime-server" "$target_dir/release/lime-server"

log "building the .deb"
cargo deb -p lime-server --no-build --strip >&2
deb=$(ls -t "$target_dir"/debian/lime-server_*.deb | head -n 1)
log "building the .rpm"
# Binary-only: %install copies the files above. rpmbuild's tree, its temporary
# files, its database (Debian's rpm would make ~/.rpmdb) and the package all stay in
# the target directory.
rpmbuild_dir=$target_dir/rpmbuild
rm -rf "$rpmbuild_dir"
mkdir -p "$rpmbuild_dir/tmp" "$target_dir/rpm"
rpmbuild -bb --quiet --dbpath "$rpmbuild_dir/rpmdb" \
    --define "_topdir $rpmbuild_dir" \
    --define "_tmppath $rpmbuild_dir/tmp" \
    --define "_rpmdir $target_dir/rpm" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "pkg_version $version" \
    --define "repo $PWD" \
    --define "staging $staging" \
    packaging/rpm/lime-server.spec >&2
rpm=$(ls -t "$target_dir"/rpm/lime-server-"$version"-1.*.rpm | head -n 1)

echo "$deb"
echo "$rpm"
