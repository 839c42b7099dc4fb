#!/usr/bin/env bash
# Builds lime-server and lime-load of git revision REV (default main) for the
# "base" side of run-performance-benchmarks.sh: REV checked out in
# WORK_DIR/baseline-src (a detached git worktree of this repository, made once;
# moved to REV if it is elsewhere) and built into WORK_DIR/baseline-target, apart
# from the working tree's target. Prints the directory holding the binaries.
#
# Usage: tools/lime-load/build-baseline.sh [REV] [WORK_DIR]
# (Remove the worktree afterwards with `git worktree remove WORK_DIR/baseline-src`.)
set -euo pipefail

rev=${1:-main}
work=${2:-/tmp/lime-perf-bench}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
src=$work/baseline-src
mkdir -p "$work"
if [[ ! -d $src ]]; then
    git -C "$repo" worktree add --detach "$src" "$rev" >&2
else
    git -C "$src" checkout --detach "$rev" >&2
fi
echo "baseline: $rev = $(git -C "$src" rev-parse --short HEAD), building in $work/baseline-target" >&2
(cd "$src" && CARGO_TARGET_DIR=$work/baseline-target cargo build --release --locked \
    -p lime-server -p lime-load >&2)
echo "$work/baseline-target/release"
