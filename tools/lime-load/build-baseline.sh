#!/usr/bin/env bash
# Builds lime-server and lime-load of git revision REV (default main) for the
# "base" side of run-performance-benchmarks.sh: REV's files exported (git archive,
# no worktree: the repository is left as it is) to WORK_DIR/baseline-src, built
# into WORK_DIR/baseline-target, apart from the working tree's target. Done again
# only when REV names another commit than the last build's. Prints the directory
# holding the binaries (the build's output goes to stderr).
#
# Usage: tools/lime-load/build-baseline.sh [REV] [WORK_DIR]
set -euo pipefail

rev=${1:-main}
work=${2:-/tmp/lime-perf-bench}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse --verify "$rev^{commit}")
src=$work/baseline-src
mkdir -p "$work"
if [[ $(cat "$src/.baseline-commit" 2>/dev/null) != "$commit" ]]; then
    rm -rf "$src"
    mkdir -p "$src"
    git -C "$repo" archive --format=tar "$commit" | tar -x -C "$src"
    echo "$commit" >"$src/.baseline-commit"
fi
echo "baseline: $rev = $commit, building in $work/baseline-target" >&2
(cd "$src" && CARGO_TARGET_DIR=$work/baseline-target cargo build --release --locked \
    -p lime-server -p lime-load >&2)
echo "$work/baseline-target/release"
