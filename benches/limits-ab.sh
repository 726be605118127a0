#!/usr/bin/env bash
# benches/limits-ab.sh [ROUNDS]: what increment-and-get, windows and limits
# cost beside plain increments, side by side on one cluster in one run. A
# fresh 3-shard cluster of this checkout's release binaries (the
# repository's configs, sync durability); each mode runs `tallyctl bench
# -c 64 -d 10s` with its flags, in an order that reverses every round
# (default 2 rounds). Prints each run and each mode's ratio to plain.
#
#   cargo build --release -p tally-cli -p tally-shard -p tally-coordinator
#   benches/limits-ab.sh 2
#
# Modes (1 hot counter unless said):
#   plain            Increment
#   get              Increment with return_total (one more read of every node)
#   window           Increment with window_seconds = 86400
#   limit            Increment with a limit never reached (read, decide, write)
#   limit-1000       the same over 1,000 counters (a limiter of 1,000 users)
#   plain-1000       plain over 1,000 counters, for limit-1000's ratio
#   window-b100      IncrementBatch of 100 with window_seconds = 86400
#   plain-b100       IncrementBatch of 100, for window-b100's ratio
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-2}
PIDS=()
die() {
    echo "limits-ab.sh: $*" >&2
    exit 1
}
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
# shellcheck source=tally-cluster.sh
source "$REPO/benches/tally-cluster.sh"

declare -A flags=(
    [plain]="--counters 1 -b 1"
    [get]="--counters 1 -b 1 --get"
    [window]="--counters 1 -b 1 --window 1d"
    [limit]="--counters 1 -b 1 --limit 9000000000000000000"
    [limit-1000]="--counters 1000 -b 1 --limit 9000000000000000000"
    [plain-1000]="--counters 1000 -b 1"
    [window-b100]="--counters 1 -b 100 --window 1d"
    [plain-b100]="--counters 1 -b 100"
)
modes=(plain get window limit plain-1000 limit-1000 plain-b100 window-b100)
declare -A total
for mode in "${modes[@]}"; do
    total[$mode]=0
done

echo "$(git -C "$REPO" rev-parse --short HEAD), $(date -u +%FT%TZ)"
dir=$(mktemp -d)
tally_start_cluster "$dir" 3
for ((round = 1; round <= ROUNDS; round++)); do
    order=("${modes[@]}")
    if ((round % 2 == 0)); then
        order=()
        for ((i = ${#modes[@]} - 1; i >= 0; i--)); do
            order+=("${modes[i]}")
        done
    fi
    for mode in "${order[@]}"; do
        # shellcheck disable=SC2086  # the flags are words
        rate=$("$REPO/target/release/tallyctl" --endpoint "$TALLY_ENDPOINT" --json \
            bench -c 64 -d 10s ${flags[$mode]} \
            | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["check"] == "ok" or r["check"].startswith("skipped: the window"), r["check"]; print(round(r["increments_per_sec"]))')
        echo "round $round, $mode: $rate increments/s"
        total[$mode]=$((total[$mode] + rate))
    done
done
tally_stop_cluster
rm -rf "$dir"
ratio() { # MODE BASE
    python3 -c "print(f'$1/$2: {${total[$1]} / ${total[$2]}:.3f} (means of $ROUNDS rounds: {${total[$1]} / $ROUNDS:.0f} vs {${total[$2]} / $ROUNDS:.0f} increments/s)')"
}
ratio get plain
ratio window plain
ratio limit plain
ratio limit-1000 plain-1000
ratio window-b100 plain-b100
