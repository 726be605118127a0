#!/usr/bin/env bash
# benches/ab.sh BASE [ROUNDS]: the cost of a change, side by side in one
# run. Builds BASE (a commit) in a worktree and this checkout, both release,
# then alternates them, ROUNDS times (default 2; which goes first
# alternates too): a fresh 3-shard cluster
# per run (the repository's configs, sync durability) and `tallyctl bench
# -c 64 -d 10s --counters 100000`, unkeyed then `--keyed`. Alternating in
# one run is what makes the ratio worth quoting on a machine whose speed
# drifts between runs.
#
#   benches/ab.sh bdbab12
#
# The worktree is ${TMPDIR:-/tmp}/tally-ab-BASE (kept, so a second run
# reuses its build); remove it with `git worktree remove`.
set -euo pipefail

THIS=$(cd "$(dirname "$0")/.." && pwd)
BASE=${1:?usage: benches/ab.sh BASE [ROUNDS]}
ROUNDS=${2:-2}
OLD="${TMPDIR:-/tmp}/tally-ab-$BASE"
PIDS=()
die() {
    echo "ab.sh: $*" >&2
    exit 1
}
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT

if [[ ! -d $OLD ]]; then
    git -C "$THIS" worktree add -q --detach "$OLD" "$BASE" || die "no worktree for $BASE"
fi
for tree in "$OLD" "$THIS"; do
    (cd "$tree" && cargo build --release -q -p tally-cli -p tally-shard -p tally-coordinator) \
        || die "build failed in $tree"
done

run() { # LABEL TREE [--keyed]
    local label=$1 tree=$2 dir
    shift 2
    # tally-cluster.sh starts the binaries of $REPO.
    REPO=$tree
    # shellcheck source=tally-cluster.sh
    source "$tree/benches/tally-cluster.sh"
    dir=$(mktemp -d)
    tally_start_cluster "$dir" 3
    printf '%-8s %-8s ' "$label" "${1:-unkeyed}"
    "$tree/target/release/tallyctl" --endpoint "http://$TALLY_ENDPOINT" \
        bench -c 64 -d 10s --counters 100000 "$@" 2>&1 | grep -E '^ *increments:' | tr -s ' '
    tally_stop_cluster
    rm -rf "$dir"
}

echo "base $(git -C "$OLD" rev-parse --short HEAD), this checkout $(git -C "$THIS" rev-parse --short HEAD), $(date -u +%F)"
for ((round = 1; round <= ROUNDS; round++)); do
    for mode in "" --keyed; do
        # Which tree goes first alternates by round: this machine drifts
        # within a run, which would otherwise always count against one.
        if ((round % 2 == 1)); then
            # shellcheck disable=SC2086  # an empty mode is no argument
            run base "$OLD" $mode
            # shellcheck disable=SC2086
            run this "$THIS" $mode
        else
            # shellcheck disable=SC2086
            run this "$THIS" $mode
            # shellcheck disable=SC2086
            run base "$OLD" $mode
        fi
    done
done
