#!/usr/bin/env bash
# benches/scale.sh: Tally's scale figures (docs/BENCHMARKS.md, "Scale"), on
# real processes on loopback:
#   1. throughput with 1, 1,000 and 1,000,000 distinct counters (3 shards);
#   2. Get and GetBatch(1000) latency with 3 and 6 shards, alone and under a
#      concurrent write load;
#   3. restart time of a shard holding a third of 1,000,000 counters (3
#      shards, replication factor 2, every counter written once): after
#      SIGTERM (a last checkpoint: nothing to replay), and after SIGKILL
#      (the log since the last checkpoint replayed, and the checkpoint
#      loaded from a checked copy if a round was running), with resident
#      memory per stored entry.
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

# 3. Restart time and memory: 3 shards (the shipped replication factor 2),
# 1,000,000 counters written once each (examples/fill.rs: one entry per
# counter), then the shard holding the most entries restarted.
(cd "$REPO" && cargo build --release --quiet --example fill)
start_cluster memory 3 2
log "memory: writing 1,000,000 counters"
"$REPO/target/release/examples/fill" write --endpoint "$TALLY_ENDPOINT" --prefix m- --counters 1000000 >/dev/null
# The shard with the most own entries and copies: the largest data directory.
index=0
largest=0
for i in 1 2 3; do
    size=$(du -sk "$TMP/memory/data/shard-$i" | cut -f1)
    if ((size > largest)); then largest=$size; index=$((i - 1)); fi
done
shard=${TALLY_SHARD_PIDS[$index]}
stored=$(entries)
rss_after=$(rss_kib "$shard")
log "memory: $stored entries in all; restarting shard-$((index + 1)) (RSS $rss_after KiB)"

# restart SIGNAL: stops the shard with SIGNAL and starts it again on its
# address; sets RESTART_MS, the time from launch to serving.
restart() {
    kill "-$1" "$shard"
    wait "$shard" 2>/dev/null || true
    tally_start_shard "$TMP/memory" $((index + 1)) "${TALLY_SHARD_ADDRESSES[$index]}"
    shard=$TALLY_PID
    TALLY_SHARD_PIDS[index]=$shard
    RESTART_MS=$TALLY_START_MS
}
restart TERM
clean_ms=$RESTART_MS
# Once its checkpoint thread has closed sled (6 s without a round).
sleep 8
rss_loaded=$(rss_kib "$shard")
# More writes, so that the SIGKILL leaves log to replay.
"$REPO/target/release/examples/fill" write --endpoint "$TALLY_ENDPOINT" --prefix m2- --counters 300000 >/dev/null
restart KILL
crash_ms=$RESTART_MS
shard_entries=$(grep -o ' entries=[0-9]*' "$TMP/memory/shard-$((index + 1)).out.err" | tail -n 1 | cut -d= -f2)
replica_entries=$(grep -o ' replica_entries=[0-9]*' "$TMP/memory/shard-$((index + 1)).out.err" | tail -n 1 | cut -d= -f2)
replayed=$(grep -o ' log_frames=[0-9]*' "$TMP/memory/shard-$((index + 1)).out.err" | tail -n 1 | cut -d= -f2)
"$REPO/target/release/examples/fill" check --endpoint "$TALLY_ENDPOINT" --prefix m- --counters 1000000 >/dev/null \
    || die "counters changed across restarts"
record "memory" "$(python3 -c 'import json,sys; print(json.dumps(dict(zip(
    ["entries","shard_entries","shard_replica_entries","log_frames_replayed","rss_after_writes_kib","rss_after_restart_kib","restart_clean_ms","restart_after_kill_ms"],
    map(int, sys.argv[1:])))))' "$stored" "$shard_entries" "$replica_entries" "$replayed" "$rss_after" "$rss_loaded" "$clean_ms" "$crash_ms")"
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
held = m["shard_entries"] + m["shard_replica_entries"]
print()
print(f'Restart of the shard holding the most (of {m["entries"]:,} entries in all, 3 shards, '
      f'replication factor 2): {m["shard_entries"]:,} own entries and {m["shard_replica_entries"]:,} '
      f'replica entries. To serving: {m["restart_clean_ms"]} ms after SIGTERM, '
      f'{m["restart_after_kill_ms"]} ms after SIGKILL ({m["log_frames_replayed"]:,} log frames read).')
print(f'Its resident memory: {m["rss_after_writes_kib"] * 1024 / held:.0f} bytes per entry held after the writes, '
      f'{m["rss_after_restart_kib"] * 1024 / held:.0f} after the clean restart (whole process).')
EOF
cat "$OUT/scale.md"
