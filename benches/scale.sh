#!/usr/bin/env bash
# benches/scale.sh: Tally's scale figures (docs/BENCHMARKS.md, "Scale"), on
# real processes on loopback:
#   1. throughput with 1, 1,000 and 1,000,000 distinct counters (3 shards);
#   2. Get and GetBatch(1000) latency with 3 and 6 shards, alone and under a
#      concurrent write load;
#   3. a shard's resident memory per stored entry at ~1,000,000 entries, and
#      the time for that shard to restart and serve (after SIGTERM, and after
#      SIGKILL, which adds the start-up copy check).
#
# Usage: benches/scale.sh            (CLIENTS=64, DURATION=10)
#        DURATION=3 benches/scale.sh  (a quick look)
# Writes OUT/scale.json (default target/scale) and prints a summary.

set -euo pipefail

CLIENTS=${CLIENTS:-64}
DURATION=${DURATION:-10}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/target/scale}
BIN=$REPO/target/release
TMP=$(mktemp -d)
PIDS=()

log() { printf '[scale] %s\n' "$*" >&2; }
die() { printf '[scale] FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# shellcheck source=benches/tally-cluster.sh
source "$REPO/benches/tally-cluster.sh"

# start_cluster NAME SHARDS REPLICATION [STRIPES]: shards and a coordinator
# under $TMP/NAME (see tally-cluster.sh).
start_cluster() {
    tally_start_cluster "$TMP/$1" "$2" "replication_factor=$3" "stripes=${4:-8}"
}

bench() {
    "$BIN/tallyctl" --endpoint "$TALLY_ENDPOINT" --json --timeout-ms 30000 bench "$@"
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

entries() {
    "$BIN/tallyctl" --endpoint "$TALLY_ENDPOINT" --json status |
        python3 -c 'import json,sys; print(sum(n["entries"] for n in json.load(sys.stdin)["nodes"]))'
}

log "building release binaries"
(cd "$REPO" && cargo build --release --quiet -p tally-shard -p tally-coordinator -p tally-cli)
mkdir -p "$OUT"
RESULTS=$OUT/scale.jsonl
: >"$RESULTS"
record() { # record NAME JSON
    python3 -c 'import json,sys; d=json.loads(sys.argv[2]); d["name"]=sys.argv[1]; print(json.dumps(d))' "$1" "$2" >>"$RESULTS"
}

# 1. Throughput by number of counters.
start_cluster throughput 3 2
for counters in 1 1000 1000000; do
    for batch in 1 100; do
        log "throughput: $counters counters, batch $batch"
        record "write counters=$counters batch=$batch" \
            "$(bench --clients "$CLIENTS" --duration "${DURATION}s" --counters "$counters" --batch "$batch")"
    done
done
tally_stop_cluster

# 2. Read latency with 3 and 6 shards.
for shards in 3 6; do
    start_cluster "reads-$shards" "$shards" 2
    prefix="r$shards-"
    log "reads, $shards shards: writing 1,000 counters"
    bench --prefix "$prefix" --counters 1000 --batch 100 --requests 2000 --no-check >/dev/null
    log "reads, $shards shards: Get, GetBatch(1000), Get under writes"
    record "get shards=$shards" \
        "$(bench --prefix "$prefix" --no-check --clients "$CLIENTS" --duration "${DURATION}s" --counters 1000 --reads 100)"
    record "getbatch1000 shards=$shards" \
        "$(bench --prefix "$prefix" --no-check --clients 8 --duration "${DURATION}s" --counters 1000 --batch 1000 --reads 100)"
    record "get+writes shards=$shards" \
        "$(bench --clients "$CLIENTS" --duration "${DURATION}s" --counters 1000 --reads 50)"
    tally_stop_cluster
done

# 3. Memory per entry and restart time: one shard, no replica, so that its
# memory holds only its own entries; one stripe, so that an entry is a
# counter. 3,000,000 increments over 1,000,000 counters leave ~950,000.
start_cluster memory 1 1 1
shard=${TALLY_SHARD_PIDS[0]}
rss_before=$(rss_kib "$shard")
log "memory: writing 1,000,000 counters"
bench --prefix m- --counters 1000000 --batch 1000 --clients 16 --requests 3000 --no-check >/dev/null
stored=$(entries)
rss_after=$(rss_kib "$shard")
log "memory: $stored entries, RSS $rss_before -> $rss_after KiB"

# restart SIGNAL: stops the shard with SIGNAL and starts it again on its
# address; sets RESTART_MS, the time from launch to serving.
restart() {
    kill "-$1" "$shard"
    wait "$shard" 2>/dev/null || true
    tally_start_shard "$TMP/memory" 1 "${TALLY_SHARD_ADDRESSES[0]}"
    shard=$TALLY_PID
    TALLY_SHARD_PIDS=("$shard")
    RESTART_MS=$TALLY_START_MS
}
restart TERM
clean_ms=$RESTART_MS
rss_loaded=$(rss_kib "$shard")
restart KILL
crash_ms=$RESTART_MS
[[ $(entries) == "$stored" ]] || die "entries changed across restarts"
record "memory" "$(python3 -c 'import json,sys; print(json.dumps(dict(zip(
    ["entries","rss_before_kib","rss_after_writes_kib","rss_after_restart_kib","restart_clean_ms","restart_after_kill_ms"],
    map(int, sys.argv[1:])))))' "$stored" "$rss_before" "$rss_after" "$rss_loaded" "$clean_ms" "$crash_ms")"
tally_stop_cluster

python3 - "$RESULTS" >"$OUT/scale.md" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| run | calls/s | increments/s | write p50/p99/p999 µs | read p50/p99/p999 µs |")
print("|---|---|---|---|---|")
for r in rows:
    if r["name"] == "memory":
        continue
    lat = lambda l: f'{l["p50"]}/{l["p99"]}/{l["p999"]}' if l else "–"
    print(f'| {r["name"]} | {r["ops_per_sec"]:,.0f} | {r["increments_per_sec"]:,.0f} | '
          f'{lat(r["write_latency_us"])} | {lat(r["read_latency_us"])} |')
m = next(r for r in rows if r["name"] == "memory")
per_entry = (m["rss_after_writes_kib"] - m["rss_before_kib"]) * 1024 / m["entries"]
per_entry_loaded = m["rss_after_restart_kib"] * 1024 / m["entries"]
print()
print(f'Memory: {m["entries"]:,} entries; resident memory grew by {per_entry:.0f} bytes per entry '
      f'while writing; after a restart the whole process holds {per_entry_loaded:.0f} bytes per entry.')
print(f'Restart to serving with {m["entries"]:,} entries: {m["restart_clean_ms"]} ms after SIGTERM, '
      f'{m["restart_after_kill_ms"]} ms after SIGKILL (includes the copy check).')
EOF
cat "$OUT/scale.md"
