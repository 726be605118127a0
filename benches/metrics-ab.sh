#!/usr/bin/env bash
# benches/metrics-ab.sh [ROUNDS]: what metrics cost, side by side in one
# run. A fresh 3-shard cluster of this checkout's release binaries (the
# repository's configs, sync durability) with metrics off and on (served,
# not scraped), alternated ROUNDS times (default 4; which side goes first
# alternates too), `tallyctl bench -c 64 -d 10s --counters 1 -b 100` each:
# the batch rows of benches/compare.sh, with more rounds than it has.
# Prints each run and the on/off ratio of the means.
#
#   cargo build --release -p tally-cli -p tally-shard -p tally-coordinator
#   benches/metrics-ab.sh 4
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-4}
PIDS=()
die() {
    echo "metrics-ab.sh: $*" >&2
    exit 1
}
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
# shellcheck source=tally-cluster.sh
source "$REPO/benches/tally-cluster.sh"

declare -A total=([off]=0 [on]=0)
echo "$(git -C "$REPO" rev-parse --short HEAD), $(date -u +%FT%TZ)"
for ((round = 1; round <= ROUNDS; round++)); do
    order="off on"
    if ((round % 2 == 0)); then
        order="on off"
    fi
    for metrics in $order; do
        dir=$(mktemp -d)
        TALLY_METRICS=$metrics tally_start_cluster "$dir" 3
        rate=$("$REPO/target/release/tallyctl" --endpoint "http://$TALLY_ENDPOINT" --json \
            bench -c 64 -d 10s --counters 1 -b 100 \
            | python3 -c 'import json, sys; print(round(json.load(sys.stdin)["increments_per_sec"]))')
        echo "round $round, metrics $metrics: $rate increments/s"
        total[$metrics]=$((total[$metrics] + rate))
        tally_stop_cluster
        rm -rf "$dir"
    done
done
python3 -c "print(f'metrics on/off, batch 100, 1 hot counter: {${total[on]} / ${total[off]}:.3f} (means of $ROUNDS rounds)')"
