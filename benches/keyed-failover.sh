#!/usr/bin/env bash
# benches/keyed-failover.sh: keyed increments while a shard is down, with
# the repository's configs (config/*.toml: 3 shards, replication factor 2,
# sync durability), release build, real processes on loopback.
#
# Three runs of `tallyctl bench --keyed` (8 clients, unary, 1,000 counters,
# each run checking every total it wrote against what was acknowledged):
#   1. steady: every shard up;
#   2. down: shard-2 SIGKILLed before the run and left down through it (its
#      keyed increments are taken over by its stand-in);
#   3. return: shard-2 still down when the run starts, started again with its
#      data halfway through: its takeover is reconciled under load, and the
#      check reads every total after it.
# Prints each run's report and the down/steady ratio of increments/s.
#
# Usage: benches/keyed-failover.sh [SECONDS per run, default 10]
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_PER_RUN=${1:-10}
PIDS=()
die() {
    echo "keyed-failover: $*" >&2
    exit 1
}
WORK=$(mktemp -d)
cleanup() {
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/tally-cluster.sh
source "$REPO/benches/tally-cluster.sh"

cargo build --release --workspace --bins --manifest-path "$REPO/Cargo.toml" >&2
TALLYCTL="$REPO/target/release/tallyctl"

tally_start_cluster "$WORK" 3
ENDPOINT="http://$TALLY_ENDPOINT"

# Waits until the coordinator shows NODE with HEALTH (up or down).
wait_for_health() { # NODE HEALTH
    local i
    for ((i = 0; i < 3000; i++)); do
        if "$TALLYCTL" --endpoint "$ENDPOINT" --json status 2>/dev/null |
            python3 -c 'import json, sys
nodes = json.load(sys.stdin)["nodes"]
sys.exit(0 if any(n["id"] == sys.argv[1] and n["health"] == sys.argv[2] for n in nodes) else 1)' "$1" "$2"; then
            return 0
        fi
        sleep 0.01
    done
    die "$1 never shown $2"
}

bench() { # LABEL [SECONDS]
    echo "== $1" >&2
    "$TALLYCTL" --endpoint "$ENDPOINT" --json bench --keyed -c 8 --counters 1000 \
        -d "${2:-$SECONDS_PER_RUN}s" | tee "$WORK/$1.json"
}
rate() { # LABEL
    sed -n 's/.*"increments_per_sec":\([0-9.]*\).*/\1/p' "$WORK/$1.json"
}

bench steady

kill -KILL "${TALLY_SHARD_PIDS[1]}"
wait_for_health shard-2 down
bench down

# Started again halfway through the third run, on its address, with its data.
bench return $((2 * SECONDS_PER_RUN)) &
BENCH=$!
sleep "$SECONDS_PER_RUN"
tally_start_shard "$WORK" 2 "${TALLY_SHARD_ADDRESSES[1]}"
wait "$BENCH"

for run in steady down return; do
    grep -q '"check":"ok"' "$WORK/$run.json" || die "the $run run's check failed"
done
awk -v down="$(rate down)" -v steady="$(rate steady)" 'BEGIN { printf "down/steady increments/s: %.0f / %.0f = %.2f\n", down, steady, down / steady }'
