#!/usr/bin/env bash
# benches/tls-ab.sh [ROUNDS]: what TLS on both hops and tokens cost, side
# by side in one run. A fresh 3-shard cluster of this checkout's release
# binaries (the repository's configs, sync durability), plaintext and
# secure (TLS on the public port, mutual TLS to the shards, a bearer token
# checked on every call: config/secure/), alternated ROUNDS times (default
# 2; which side goes first alternates too). Each runs `tallyctl bench -c 64
# -d 10s --counters 1`, unary (-b 1) and batch 100 (-b 100). Prints each
# run and the secure/plain ratio of the means.
#
#   cargo build --release -p tally-cli -p tally-shard -p tally-coordinator
#   benches/tls-ab.sh 2
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-2}
PIDS=()
die() {
    echo "tls-ab.sh: $*" >&2
    exit 1
}
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
# shellcheck source=tally-cluster.sh
source "$REPO/benches/tally-cluster.sh"

declare -A total=([plain_1]=0 [secure_1]=0 [plain_100]=0 [secure_100]=0)
echo "$(git -C "$REPO" rev-parse --short HEAD), $(date -u +%FT%TZ)"
for ((round = 1; round <= ROUNDS; round++)); do
    order="plain secure"
    if ((round % 2 == 0)); then
        order="secure plain"
    fi
    for mode in $order; do
        dir=$(mktemp -d)
        unset TALLY_CA_CERT TALLY_TOKEN
        secure=off
        if [[ $mode == secure ]]; then
            secure=on
        fi
        TALLY_SECURE=$secure tally_start_cluster "$dir" 3
        for batch in 1 100; do
            rate=$("$REPO/target/release/tallyctl" --endpoint "$TALLY_ENDPOINT" --json \
                bench -c 64 -d 10s --counters 1 -b "$batch" \
                | python3 -c 'import json, sys; r = json.load(sys.stdin); assert r["check"] == "ok", r["check"]; print(round(r["increments_per_sec"]))')
            echo "round $round, $mode, batch $batch: $rate increments/s"
            total[${mode}_$batch]=$((total[${mode}_$batch] + rate))
        done
        tally_stop_cluster
        rm -rf "$dir"
    done
done
for batch in 1 100; do
    python3 -c "print(f'secure/plain, batch $batch, 1 hot counter: {${total[secure_$batch]} / ${total[plain_$batch]}:.3f} (means of $ROUNDS rounds: {${total[secure_$batch]} / $ROUNDS:.0f} vs {${total[plain_$batch]} / $ROUNDS:.0f} increments/s)')"
done
