#!/usr/bin/env bash
# benches/compare.sh: Tally against Redis and PostgreSQL doing the same job,
# counting increments, on this machine, with the same number of clients;
# against a ceiling for its unary calls; and the memory each needs per
# counter.
#
# Usage (from anywhere; paths are resolved against the repository):
#   benches/compare.sh                      # CLIENTS=64, DURATION=10 seconds
#   CLIENTS=32 DURATION=3 benches/compare.sh
#   TALLY_SKIP=1 benches/compare.sh         # Redis and PostgreSQL only
#
# Environment:
#   CLIENTS       concurrent connections / client tasks for every tool (64)
#   DURATION      seconds each measurement runs (10)
#   OUT           output directory (target/compare in the repository)
#   TALLY_SKIP    1: skip building and measuring Tally (and the ceiling)
#   READS         --reads passed to `tallyctl bench` (0: increments only, as
#                 the Redis and PostgreSQL runs only write)
#   MEM_COUNTERS  counters written for the memory rows (1000000)
#   KEEP_TMP      1: keep the temporary directory (logs, data) for inspection
#
# What it measures:
#   - Throughput rows: redis-benchmark, pgbench and `tallyctl bench` against
#     a Tally cluster of separate processes (3 shards, 1 coordinator, sync).
#   - Ceiling rows: `examples/ceiling.rs`, a trivial in-memory
#     tally.v1.Counter server on the coordinator's own stack (tonic, same
#     server plumbing, one hop, no disk), driven exactly like Tally's unary
#     rows; Tally's unary figures are reported as a fraction of it.
#   - Async rows: Tally's unary rows again with durability = "async", for
#     the sync/async ratio.
#   - Metrics rows: Tally unary and batch 100 on one hot counter with
#     metrics off and on, alternated twice; the on/off ratios go to
#     OUT/metrics-ab.txt.
#   - Secure rows: Tally unary and batch 100 on one hot counter with TLS on
#     the public port, mutual TLS to the shards and a token checked on every
#     call (TALLY_SECURE=on: config/secure/), beside plaintext runs of the
#     same shape made right before them; the secure/plain ratios go to
#     OUT/secure-ab.txt.
#   - h2load rows: h2load (nghttp2) sends unary Increment calls to Tally and
#     to the ceiling, one hot counter, with 8 connections x 8 streams and
#     with CLIENTS connections x 1 stream, beside `tallyctl bench` at the same
#     concurrency, so that the load generator's own cost shows. h2load runs
#     a fixed number of calls (-n, sized from a 1 s calibration run to last
#     about DURATION seconds), not -D: with -D the calls in flight at the end
#     reach the server uncounted, so the counter could only bound the count.
#   - Memory rows: resident memory per counter at MEM_COUNTERS counters,
#     each written once: Redis (INCR of distinct keys through redis-cli
#     --pipe; VmRSS and INFO used_memory) and Tally (3 shards,
#     replication_factor 2; VmRSS summed over the shard processes, after the
#     writes and replication settled, and again after restarting every
#     shard), as (RSS after - RSS before the writes) / counters.
#
# Every row checks itself: Redis's key, PostgreSQL's row and the h2load
# counters must grow by exactly what the tool counted, `tallyctl bench`
# reads every counter back, and the memory rows read every counter back.
#
# What it does: installs redis-server, postgresql and nghttp2-client (h2load)
# from Debian when missing, starts private servers on free loopback ports with
# their data in a fresh temporary directory (never the system services),
# measures, stops every process it started (exit trap), and writes
# OUT/results.json, OUT/results.md and OUT/compare.svg (benches/chart.py),
# plus the raw output of every tool in OUT/raw/.
#
# Everything runs on one machine: the load generators share the CPU with the
# server they measure, for every system alike.

set -euo pipefail

CLIENTS=${CLIENTS:-64}
DURATION=${DURATION:-10}
TALLY_SKIP=${TALLY_SKIP:-0}
READS=${READS:-0}
MEM_COUNTERS=${MEM_COUNTERS:-1000000}
KEEP_TMP=${KEEP_TMP:-0}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/target/compare}

[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || { echo "CLIENTS must be a positive integer" >&2; exit 2; }
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "DURATION must be a positive integer (seconds)" >&2; exit 2; }
[[ $MEM_COUNTERS =~ ^[1-9][0-9]*$ ]] || { echo "MEM_COUNTERS must be a positive integer" >&2; exit 2; }

log() { printf '[compare] %s\n' "$*" >&2; }
die() { printf '[compare] FAILED: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Cleanup: every server this script starts is registered here, so that the
# exit trap stops it whatever way the script ends.

TMP=""
PIDS=()          # background servers started by this script (redis, tally)
PG_DATA=""       # set once initdb ran; postgres daemonizes, pg_ctl stops it
PG_BIN=""
PG_USER=""

# Runs a command as the PostgreSQL OS user: postgres refuses to run as root.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

# Stops one process we started: SIGTERM (a clean stop for redis and the Tally
# daemons), SIGKILL after 15 s, then reaps it and forgets it.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# Drops a process that has exited (and been waited for) from PIDS.
forget_pid() {
    local kept=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$1" ]] || kept+=("$p")
    done
    PIDS=("${kept[@]}")
}

stop_postgres() {
    [[ -n $PG_DATA && -f $PG_DATA/postmaster.pid ]] || return 0
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1; then
        # pg_ctl could not stop it: kill the postmaster by its pid file.
        local pid
        pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)
        if [[ -n $pid ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    stop_postgres
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $rc -ne 0 && -d $OUT/raw ]]; then
            # The servers' logs explain most failures: keep them (only them,
            # not the data) before the temporary directory goes.
            mkdir -p "$OUT/raw/logs"
            (cd "$TMP" && find . -maxdepth 3 -type f \( -name '*.log' -o -name '*.out' \
                -o -name '*.err' -o -name stdout \) -exec cp --parents {} "$OUT/raw/logs" \;)
            log "server logs copied to $OUT/raw/logs"
        fi
        if [[ $KEEP_TMP == 1 ]]; then
            log "kept $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    if [[ $rc -ne 0 ]]; then
        log "exit status $rc"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# 1. Peers: install what is missing from Debian's packages.

SUDO=()
if [[ $EUID -ne 0 ]]; then
    SUDO=(sudo)
fi

pg_bin_dir() {
    # The newest installed server version (Debian keeps them side by side).
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null \
        | sort -V | tail -n 1)
    [[ -n $dir ]] && dirname "$dir"
}

missing=()
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null \
    || ! command -v redis-cli >/dev/null; then
    missing+=(redis-server)
fi
if [[ -z $(pg_bin_dir || true) ]]; then
    missing+=(postgresql)
fi
if ! command -v pgbench >/dev/null || ! command -v psql >/dev/null; then
    missing+=(postgresql-client)
fi
if ! command -v h2load >/dev/null; then
    missing+=(nghttp2-client)
fi
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

PG_BIN=$(pg_bin_dir) || die "no PostgreSQL server under /usr/lib/postgresql/*/bin"
command -v python3 >/dev/null || die "python3 is needed (results and chart)"
command -v h2load >/dev/null || die "no h2load after installing nghttp2-client"

# ---------------------------------------------------------------------------
# Working directory and helpers.

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/raw"
mkdir -p "$OUT/raw"
TMP=$(mktemp -d)
# The PostgreSQL user must be able to reach its directory inside TMP.
chmod 711 "$TMP"
MEASUREMENTS=$TMP/measurements.jsonl
: >"$MEASUREMENTS"
MEMORY=$TMP/memory.jsonl
: >"$MEMORY"

# Small Python helpers for parsing tool output and assembling JSON (bash is
# a poor JSON writer). Standard library only.
HELPER=$TMP/helper.py
cat >"$HELPER" <<'PY'
import csv, glob, json, os, sys

def percentile(sorted_values, q):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]

def redis_csv(path):
    # redis-benchmark --csv: a header line and one row per test.
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    print(row["rps"], row.get("p50_latency_ms", ""), row.get("p99_latency_ms", ""))

def pg_latency(prefix):
    # pgbench -l: one line per transaction, the third field is its latency in us.
    values = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    values.append(int(fields[2]))
    values.sort()
    p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
    print("" if p50 is None else p50 / 1000.0, "" if p99 is None else p99 / 1000.0)

def num(text):
    return None if text in ("", None) else float(text)

def record(path, ident, system, label, ops, incs, p50, p99, command, extra_json="",
           extra_key="tally"):
    entry = {
        "id": ident,
        "system": system,
        "label": label,
        "ops_per_sec": num(ops),
        "increments_per_sec": num(incs),
        "latency_ms": {"p50": num(p50), "p99": num(p99)},
        "command": command,
    }
    if extra_json:
        with open(extra_json) as f:
            entry[extra_key] = json.load(f)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")

def tally_field(path, field):
    with open(path) as f:
        data = json.load(f)
    value = data
    for part in field.split("."):
        value = value[part]
    print(value)

def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)

def grpc_body(counter, delta, path):
    # One gRPC message, tally.v1.IncrementRequest{counter, delta}, written by
    # hand (no protoc): field 1 string (tag 0x0a, length, bytes), field 2
    # sint64 (tag 0x10, zigzag varint); framed as gRPC sends it: a 0 byte
    # (not compressed), the message length (4 bytes, big-endian), the message.
    name, delta = counter.encode(), int(delta)
    message = b"\x0a" + varint(len(name)) + name
    if delta:
        message += b"\x10" + varint(((delta << 1) ^ (delta >> 63)) & (2**64 - 1))
    with open(path, "wb") as f:
        f.write(b"\x00" + len(message).to_bytes(4, "big") + message)

def h2load(path, log=""):
    # h2load's summary: the request counts and the wall time; latency
    # percentiles from its --log-file (start, HTTP status, microseconds).
    counts, seconds = None, None
    with open(path) as f:
        for line in f:
            if line.startswith("finished in "):
                value = line.split()[2].rstrip(",")
                for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
                    if value.endswith(unit):
                        seconds = float(value[: -len(unit)]) * scale
                        break
            elif line.startswith("requests: "):
                words = line.replace(",", "").split()
                counts = {words[i + 1]: int(words[i]) for i in range(1, len(words) - 1, 2)}
    if counts is None or seconds is None:
        raise SystemExit(f"cannot read h2load output {path}")
    values = []
    if log:
        with open(log) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    values.append(int(fields[2]))
    values.sort()
    p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
    print(counts["total"], counts["started"], counts["done"], counts["succeeded"],
          counts["failed"], counts["errored"], counts["timeout"], seconds,
          "" if p50 is None else p50 / 1000.0, "" if p99 is None else p99 / 1000.0)

def get_value(path):
    # `tallyctl --json get COUNTER`: one complete total.
    with open(path) as f:
        [total] = json.load(f)
    if not total["complete"]:
        raise SystemExit(f"{path}: total is not complete")
    print(total["value"])

def entries(path):
    # `tallyctl --json status`: own entries summed over nodes, and how many
    # nodes are up.
    with open(path) as f:
        nodes = json.load(f)["nodes"]
    print(sum(n["entries"] for n in nodes),
          sum(1 for n in nodes if n["reachable"] and n["health"] == "up"), len(nodes))

def resp_incr(prefix, count):
    # INCR PREFIX0 .. PREFIX{count-1} in Redis's protocol, for redis-cli --pipe.
    out = sys.stdout.buffer
    for i in range(int(count)):
        key = f"{prefix}{i}".encode()
        out.write(b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key))

def memory(path, ident, system, label, counters, before_kib, after_kib, formula,
           extra_json="{}"):
    before, after, counters = int(before_kib), int(after_kib), int(counters)
    entry = {
        "id": ident, "system": system, "label": label, "counters": counters,
        "rss_before_kib": before, "rss_after_kib": after,
        "bytes_per_counter": (after - before) * 1024 / counters,
        "formula": formula,
    }
    entry.update(json.loads(extra_json))
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")

command, args = sys.argv[1], sys.argv[2:]
{"redis-csv": redis_csv, "pg-latency": pg_latency, "record": record,
 "tally-field": tally_field, "grpc-body": grpc_body, "h2load": h2load,
 "get-value": get_value, "entries": entries, "resp-incr": resp_incr,
 "memory": memory}[command](*args)
PY
helper() { python3 "$HELPER" "$@"; }

# A free loopback port: bind port 0 and report what the kernel picked.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Resident memory of a process, in KiB (VmRSS in /proc/PID/status).
rss_kib() {
    local rss
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null) || true
    [[ -n $rss ]] || die "no VmRSS for process $1 (did it exit?)"
    echo "$rss"
}

# ---------------------------------------------------------------------------
# 2a. Redis: a private server, foreground process (so we own its pid).

REDIS_PORT=""
REDIS_PID=""

start_redis() { # NAME [persistence options...]
    local name=$1
    shift
    local dir=$TMP/redis-$name i
    mkdir -p "$dir"
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --dir "$dir" \
        --daemonize no --logfile "$dir/redis.log" "$@" >"$dir/stdout" 2>&1 &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    # Ready when it answers PING (polled; no fixed sleep).
    for ((i = 0; i < 300; i++)); do
        if [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null || true) == PONG ]]; then
            log "redis ($name) on 127.0.0.1:$REDIS_PORT: $*"
            return 0
        fi
        kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited; see $dir/redis.log: $(tail -n 5 "$dir/redis.log" 2>/dev/null)"
        sleep 0.1
    done
    die "redis-server not answering after 30 s"
}

stop_redis() {
    stop_pid "$REDIS_PID"
    REDIS_PID=""
}

# redis-benchmark has no duration option: size -n so that the run takes about
# DURATION seconds, from calibration runs grown until one lasts >= 1 s (they
# also warm the server up). Every -n is a multiple of 1000: with -P the tool
# sends whole pipelines, so a count that is not a multiple of the depth
# would be rounded up and the self-check below would not know the total.
redis_measure() { # ID LABEL CHECK_KEY(1|0) [redis-benchmark options...]
    local id=$1 label=$2 check_key=$3
    shift 3
    local base=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CLIENTS" -t incr --csv "$@")
    local n=1000 rps p50 p99 sent=0 parsed
    while :; do
        "${base[@]}" -n "$n" >"$TMP/calibrate.csv" 2>>"$OUT/raw/$id.stderr"
        parsed=$(helper redis-csv "$TMP/calibrate.csv")
        read -r rps _ _ <<<"$parsed"
        sent=$((sent + n))
        if python3 -c "import sys; sys.exit(0 if $n / max($rps, 1e-9) >= 1.0 else 1)"; then
            break
        fi
        # Aim the next run at 1.2 s, growing at least 2x, at most 100x.
        n=$(python3 -c "print(max(2 * $n, min(100 * $n, round($rps * 1.2 / 1000 + 0.5) * 1000)))")
    done
    n=$(python3 -c "print(max(1000, round($rps * $DURATION / 1000) * 1000))")
    log "$label: -n $n (calibrated at ${rps%.*} ops/s)"
    "${base[@]}" -n "$n" >"$OUT/raw/$id.csv" 2>>"$OUT/raw/$id.stderr"
    sent=$((sent + n))
    parsed=$(helper redis-csv "$OUT/raw/$id.csv")
    read -r rps p50 p99 <<<"$parsed"
    if [[ $check_key == 1 ]]; then
        # Self-check: the one key holds exactly what was sent to it, so
        # every INCR landed on it (and on one key only).
        local value
        value=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" get 'counter:__rand_int__')
        [[ $value == "$sent" ]] || die "$label: key holds $value, expected $sent"
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" del 'counter:__rand_int__' >/dev/null
    fi
    helper record "$MEASUREMENTS" "$id" redis "$label" "$rps" "$rps" "$p50" "$p99" \
        "${base[*]} -n $n"
    log "$(printf '%s: %.0f ops/s' "$label" "$rps")"
}

# ---------------------------------------------------------------------------
# 2b. PostgreSQL: initdb into TMP, started by pg_ctl as a non-root user.

PG_PORT=""
PSQL=()

start_postgres() {
    if [[ $EUID -eq 0 ]]; then
        if id -u postgres >/dev/null 2>&1; then
            PG_USER=postgres
        else
            # No postgres account (unusual for the Debian package): make one
            # for this benchmark only.
            PG_USER=tally-bench-pg
            id -u "$PG_USER" >/dev/null 2>&1 \
                || useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
        fi
    else
        PG_USER=$(id -un)
    fi
    local dir=$TMP/pg
    mkdir -p "$dir"
    if [[ $EUID -eq 0 ]]; then
        chown "$PG_USER" "$dir"
    fi
    PG_PORT=$(free_port)
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-locale -E UTF8 \
        >"$dir/initdb.log" 2>&1 || die "initdb failed; see $dir/initdb.log"
    PG_DATA=$dir/data
    # max_connections: room for CLIENTS plus psql; everything else default
    # (fsync on, synchronous_commit on).
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$dir/server.log" -w -t 60 \
        -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1 -c max_connections=$((CLIENTS + 10))" \
        start >"$dir/pg_ctl.log" 2>&1 || die "PostgreSQL did not start; see $dir/server.log"
    PSQL=(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -X -q -A -t -v ON_ERROR_STOP=1)
    log "postgres on 127.0.0.1:$PG_PORT ($("$PG_BIN/postgres" --version))"
}

pg_measure() { # ID LABEL SCRIPT_FILE [env assignments for pgbench...]
    local id=$1 label=$2 script=$3
    shift 3
    # Start each run from a checkpoint, so one run's dirty pages are not
    # flushed during the next.
    "${PSQL[@]}" -c 'CHECKPOINT' >/dev/null
    local cmd=(pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "$CLIENTS" -j 2 -T "$DURATION" -n
        -f "$script" -l --log-prefix "$TMP/pglog-$id" postgres)
    env "$@" "${cmd[@]}" >"$OUT/raw/$id.txt" 2>&1 || {
        cat "$OUT/raw/$id.txt" >&2
        die "$label: pgbench failed"
    }
    local tps processed p50 p99 parsed
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$OUT/raw/$id.txt")
    processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$OUT/raw/$id.txt")
    [[ -n $tps && -n $processed ]] || die "$label: cannot read pgbench output ($OUT/raw/$id.txt)"
    if grep -q '^number of failed transactions: [1-9]' "$OUT/raw/$id.txt"; then
        die "$label: pgbench reports failed transactions"
    fi
    parsed=$(helper pg-latency "$TMP/pglog-$id")
    read -r p50 p99 <<<"$parsed"
    PG_PROCESSED=$processed
    local shown="${cmd[*]}"
    if (($#)); then
        shown="$* $shown"
    fi
    helper record "$MEASUREMENTS" "$id" postgres "$label" "$tps" "$tps" "$p50" "$p99" "$shown"
    log "$(printf '%s: %.0f tps' "$label" "$tps")"
}

# ---------------------------------------------------------------------------
# 2c. Tally: three shard processes and a coordinator, data in TMP.

# shellcheck source=benches/tally-cluster.sh
source "$REPO/benches/tally-cluster.sh"

start_tally() { # [DURABILITY]
    TALLY_DURABILITY=${1:-sync} tally_start_cluster "$TMP/tally-${1:-sync}" 3
    log "tally coordinator on $TALLY_ENDPOINT (3 shards at ${TALLY_SHARD_ADDRESSES[*]}, durability ${1:-sync})"
}

# Runs `tallyctl bench` against ENDPOINT and records it as SYSTEM's row.
# Extra arguments go to `tallyctl bench` (e.g. --connections 8).
bench_measure() { # SYSTEM ENDPOINT ID LABEL COUNTERS BATCH CLIENTS [bench options...]
    local system=$1 endpoint=$2 id=$3 label=$4 counters=$5 batch=$6 clients=$7
    shift 7
    local args=(--clients "$clients" --duration "${DURATION}s" --counters "$counters"
        --batch "$batch" --reads "$READS" "$@")
    local cmd=("$TALLYCTL" --endpoint "$endpoint" --json bench "${args[@]}")
    local rc=0
    "${cmd[@]}" >"$OUT/raw/$id.json" 2>"$OUT/raw/$id.stderr" || rc=$?
    if [[ $rc -ne 0 ]]; then
        cat "$OUT/raw/$id.json" "$OUT/raw/$id.stderr" >&2
        die "$label: tallyctl bench exited with $rc (self-check failed?)"
    fi
    local check ops incs p50 p99
    check=$(helper tally-field "$OUT/raw/$id.json" check) \
        || die "$label: no JSON from tallyctl bench ($OUT/raw/$id.json)"
    [[ $check == ok ]] || die "$label: tallyctl bench self-check: $check"
    ops=$(helper tally-field "$OUT/raw/$id.json" ops_per_sec)
    incs=$(helper tally-field "$OUT/raw/$id.json" increments_per_sec)
    p50=$(helper tally-field "$OUT/raw/$id.json" write_latency_us.p50)
    p99=$(helper tally-field "$OUT/raw/$id.json" write_latency_us.p99)
    p50=$(python3 -c "print($p50 / 1000.0)")
    p99=$(python3 -c "print($p99 / 1000.0)")
    helper record "$MEASUREMENTS" "$id" "$system" "$label" "$ops" "$incs" "$p50" "$p99" \
        "tallyctl --endpoint ADDR --json bench ${args[*]}" "$OUT/raw/$id.json"
    local errors
    errors=$(helper tally-field "$OUT/raw/$id.json" errors 2>/dev/null || echo "?")
    if [[ $errors != 0 ]]; then
        # The read-back check passed, so nothing acknowledged was lost, but
        # failed calls mean the figure is not clean: say so.
        log "WARNING: $label: $errors calls failed (see $OUT/raw/$id.json)"
    fi
    log "$(printf '%s: %.0f calls/s, %.0f increments/s' "$label" "$ops" "$incs")"
}

tally_measure() { # ID LABEL COUNTERS BATCH [bench options...]
    bench_measure tally "$TALLY_ENDPOINT" "$1" "$2" "$3" "$4" "$CLIENTS" "${@:5}"
}

# A counter's value through the public API of ENDPOINT (Tally or ceiling).
counter_value() { # ENDPOINT COUNTER
    local file=$TMP/get.json
    "$TALLYCTL" --endpoint "$1" --json get "$2" >"$file" 2>"$TMP/get.stderr" \
        || die "tallyctl get $2 at $1 failed: $(cat "$TMP/get.stderr")"
    helper get-value "$file" || die "cannot read $2 from $(cat "$file")"
}

# h2load: unary Increment of one hot counter, CONNECTIONS x STREAMS calls in
# flight, one h2load thread. The body is a gRPC-framed IncrementRequest
# written by the helper; gRPC needs POST (-d), content-type
# application/grpc and `te: trailers`.
#
# h2load counts HTTP, not gRPC: a gRPC error is an HTTP 200 whose trailers
# carry grpc-status, so h2load counts it a success. The self-check catches
# that: the counter must grow by exactly the successes times the delta. For
# the check to be exact, the measured run sends a fixed number of calls
# (-n), all of which complete before h2load exits; with -D, the calls in
# flight when time is up (up to CONNECTIONS x STREAMS) reach the server but
# are not counted, so the growth could only be bounded. -n is sized from a
# 1 s calibration run (-D 1, on another counter, so that its stragglers
# cannot land in the measured one) to last about DURATION seconds.
h2load_measure() { # SYSTEM ENDPOINT ID LABEL CONNECTIONS STREAMS
    local system=$1 endpoint=$2 id=$3 label=$4 connections=$5 streams=$6
    local url="http://$endpoint/tally.v1.Counter/Increment" delta=1 counter
    counter="h2load-$id-$(date +%s%N)"
    helper grpc-body "$counter-calibrate" "$delta" "$TMP/$id.calibrate.body"
    helper grpc-body "$counter" "$delta" "$TMP/$id.body"
    local base=(h2load -t 1 -c "$connections" -m "$streams"
        -H 'content-type: application/grpc' -H 'te: trailers')
    "${base[@]}" -D 1 -d "$TMP/$id.calibrate.body" "$url" >"$OUT/raw/$id.calibrate.txt" 2>&1 \
        || die "$label: h2load calibration failed: $(tail -n 5 "$OUT/raw/$id.calibrate.txt")"
    local parsed total started completed succeeded failed errored timeout seconds p50 p99
    parsed=$(helper h2load "$OUT/raw/$id.calibrate.txt") || die "$label: cannot read h2load output"
    read -r total started completed succeeded failed errored timeout seconds p50 p99 <<<"$parsed"
    ((succeeded > 0)) || die "$label: no call succeeded in the calibration run ($OUT/raw/$id.calibrate.txt)"
    local n
    n=$(python3 -c "print(max(10 * $connections * $streams, round($succeeded / $seconds * $DURATION)))")
    log "$label: -n $n (calibrated at $(python3 -c "print(round($succeeded / $seconds))") calls/s)"
    local before after
    before=$(counter_value "$endpoint" "$counter")
    "${base[@]}" -n "$n" -d "$TMP/$id.body" --log-file "$TMP/$id.h2log" "$url" \
        >"$OUT/raw/$id.txt" 2>&1 || die "$label: h2load failed: $(tail -n 5 "$OUT/raw/$id.txt")"
    parsed=$(helper h2load "$OUT/raw/$id.txt" "$TMP/$id.h2log") || die "$label: cannot read h2load output"
    read -r total started completed succeeded failed errored timeout seconds p50 p99 <<<"$parsed"
    ((total == n && started == n && completed == n && succeeded == n && failed == 0 \
        && errored == 0 && timeout == 0)) \
        || die "$label: h2load: asked for $n calls: $total total, $started started, $completed done, $succeeded succeeded, $failed failed, $errored errored, $timeout timed out"
    after=$(counter_value "$endpoint" "$counter")
    # Self-check: every call h2load counted applied its delta, once.
    ((after - before == succeeded * delta)) \
        || die "$label: counter grew by $((after - before)), h2load counted $succeeded successes of +$delta (gRPC errors look like HTTP 200 to h2load)"
    local ops
    ops=$(python3 -c "print($succeeded / $seconds)")
    python3 -c 'import json, sys; print(json.dumps(dict(zip(
        ["calls", "succeeded", "seconds", "connections", "streams", "counter_growth"],
        [int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]),
         int(sys.argv[5]), int(sys.argv[6])]))))' \
        "$n" "$succeeded" "$seconds" "$connections" "$streams" "$((after - before))" \
        >"$TMP/$id.h2load.json"
    helper record "$MEASUREMENTS" "$id" "$system" "$label" "$ops" "$ops" "$p50" "$p99" \
        "${base[*]} -n $n -d BODY http://ADDR/tally.v1.Counter/Increment" \
        "$TMP/$id.h2load.json" h2load
    log "$(printf '%s: %.0f calls/s (counter grew by %d = calls counted)' "$label" "$ops" "$((after - before))")"
}

# ---------------------------------------------------------------------------
# 2d. The ceiling: examples/ceiling.rs, started like a daemon.

CEILING_PID=""
CEILING_ENDPOINT=""

start_ceiling() {
    local dir=$TMP/ceiling
    mkdir -p "$dir"
    "$REPO/target/release/examples/ceiling" --listen 127.0.0.1:0 \
        >"$dir/ceiling.out" 2>"$dir/ceiling.out.err" &
    CEILING_PID=$!
    PIDS+=("$CEILING_PID")
    CEILING_ENDPOINT=$(tally_wait_listening "$CEILING_PID" "$dir/ceiling.out" ceiling)
    log "ceiling on $CEILING_ENDPOINT (examples/ceiling.rs: in memory, one hop)"
}

# ---------------------------------------------------------------------------
# 2e. Memory: resident memory per counter at MEM_COUNTERS counters.

MEM_PREFIX="counter:"
FILL=$REPO/target/release/examples/fill
MEM_SHOWN=$(python3 -c "print(f'{$MEM_COUNTERS:,}')")

# Redis: INCR of MEM_COUNTERS distinct keys (the same names Tally gets),
# pipelined through redis-cli --pipe, into a fresh server without
# persistence.
redis_memory() {
    start_redis memory --appendonly no
    local used_before used_after rss_before rss_after
    used_memory() {
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info memory | tr -d '\r' \
            | sed -n 's/^used_memory://p'
    }
    rss_before=$(rss_kib "$REDIS_PID")
    used_before=$(used_memory)
    helper resp-incr "$MEM_PREFIX" "$MEM_COUNTERS" \
        | redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --pipe >"$OUT/raw/redis_memory.txt" 2>&1 \
        || die "redis-cli --pipe failed: $(tail -n 3 "$OUT/raw/redis_memory.txt")"
    # Self-check: no error, one reply per INCR, one key per counter, each 1.
    grep -q "^errors: 0, replies: $MEM_COUNTERS\$" "$OUT/raw/redis_memory.txt" \
        || die "redis memory fill: $(tail -n 1 "$OUT/raw/redis_memory.txt"), expected $MEM_COUNTERS replies without error"
    local keys first last
    keys=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" dbsize)
    first=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" get "${MEM_PREFIX}0")
    last=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" get "${MEM_PREFIX}$((MEM_COUNTERS - 1))")
    [[ $keys == "$MEM_COUNTERS" && $first == 1 && $last == 1 ]] \
        || die "redis memory fill: $keys keys (first $first, last $last), expected $MEM_COUNTERS keys of 1"
    rss_after=$(rss_kib "$REDIS_PID")
    used_after=$(used_memory)
    helper memory "$MEMORY" redis_memory redis \
        "Redis, $MEM_SHOWN keys (INCR once each), no persistence" \
        "$MEM_COUNTERS" "$rss_before" "$rss_after" \
        "(VmRSS after - VmRSS before the INCRs) / keys" \
        "{\"used_memory_before\": $used_before, \"used_memory_after\": $used_after, \"used_memory_bytes_per_counter\": $(python3 -c "print(($used_after - $used_before) / $MEM_COUNTERS)")}"
    log "redis memory: VmRSS $rss_before -> $rss_after KiB, used_memory $used_before -> $used_after bytes, $MEM_COUNTERS keys"
    stop_redis
}

# Sum of VmRSS over the current shard processes, in KiB.
tally_shards_rss_kib() {
    local pid rss total=0
    for pid in "${TALLY_SHARD_PIDS[@]}"; do
        rss=$(rss_kib "$pid")
        total=$((total + rss))
    done
    echo "$total"
}

# `tallyctl status`: prints "ENTRIES UP NODES" (own entries summed).
tally_entries() {
    "$TALLYCTL" --endpoint "$TALLY_ENDPOINT" --json status >"$TMP/status.json" 2>"$TMP/status.stderr" \
        || die "tallyctl status failed: $(cat "$TMP/status.stderr")"
    helper entries "$TMP/status.json"
}

# Waits until the cluster has nothing left to do after the writes, i.e. the
# replicas have caught up. The shards' replication versions are not in the
# public API (`tallyctl status`), so this watches what copying costs instead.
# Replication runs every replication_interval_ms (1 s in the shipped config);
# a round that carries changes makes the origin scan them and the replica
# write them to its storage: CPU, and resident memory on the replica. So the
# cluster counts as settled after QUIET consecutive seconds (3 replication
# intervals, at least 3 s) in which the shards and the coordinator used at
# most 100 ms of CPU per second together, and the shards' summed VmRSS moved
# by at most 4 MiB. What is left then is health probes and replication
# rounds that find nothing to copy (they still scan every entry: 20-40 ms
# per second at 1,000,000 entries here). Copying 4,096-entry chunks costs far
# more than that. Gives up after 120 s. Sets SETTLE_S; appends the per-second
# CPU and RSS trace to OUT/raw/tally_memory_settle.txt.
tally_settle() { # WHAT INTERVAL_MS
    local what=$1 interval_ms=$2 begin quiet=0 needed last now ticks i trace=""
    local rss_last rss_now moved
    needed=$(((3 * interval_ms + 999) / 1000))
    ((needed >= 3)) || needed=3
    begin=$(date +%s%N)
    cpu_ticks() {
        local total=0 stat pid fields
        for pid in "${TALLY_SHARD_PIDS[@]}" "$TALLY_COORDINATOR_PID"; do
            # utime and stime, fields 14 and 15 of /proc/PID/stat: the 12th
            # and 13th after the command name (in parentheses).
            stat=$(cat "/proc/$pid/stat") || die "process $pid exited"
            read -r -a fields <<<"${stat##*) }"
            total=$((total + fields[11] + fields[12]))
        done
        echo "$total"
    }
    local hz
    hz=$(getconf CLK_TCK)
    last=$(cpu_ticks)
    rss_last=$(tally_shards_rss_kib)
    for ((i = 0; i < 120; i++)); do
        sleep 1
        now=$(cpu_ticks)
        rss_now=$(tally_shards_rss_kib)
        ticks=$((now - last))
        moved=$((rss_now - rss_last))
        last=$now
        rss_last=$rss_now
        trace+=" $((ticks * 1000 / hz))ms/${moved}KiB"
        if ((ticks * 1000 <= 100 * hz && moved <= 4096 && moved >= -4096)); then
            quiet=$((quiet + 1))
            ((quiet < needed)) || break
        else
            quiet=0
        fi
    done
    printf '%s: per second, CPU of shards + coordinator / change of shard VmRSS:%s\n' \
        "$what" "$trace" >>"$OUT/raw/tally_memory_settle.txt"
    ((quiet >= needed)) || die "$what: the cluster was still busy after 120 s (per second:$trace)"
    SETTLE_S=$(python3 -c "print(round(($(date +%s%N) - $begin) / 1e9, 1))")
    log "$what: settled after ${SETTLE_S} s ($needed s in a row under 100 ms of CPU and 4 MiB of RSS change per second)"
}

# Tally: a fresh cluster of 3 shards with the shipped coordinator config
# (replication_factor 2), MEM_COUNTERS counters written once each by
# examples/fill.rs (IncrementBatch of 1,000 consecutive names: one entry per
# counter), then every shard restarted. `tallyctl bench --counters N` would
# not do: it picks counters at random, so covering all of them takes ~14
# increments per counter (coupon collector), which land on several stripes
# each (one entry per stripe), and a memory figure per counter would depend
# on how often each was written.
tally_memory() {
    local dir=$TMP/tally-memory available
    # A few hundred bytes per counter are expected; ask for 2 KiB per
    # counter rather than let the OOM killer pick a victim on a shared
    # machine if that ever regresses.
    available=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    ((available >= MEM_COUNTERS * 2)) \
        || die "the Tally memory rows need ~$((MEM_COUNTERS * 2 / 1024)) MiB free, $((available / 1024)) MiB available; run with a smaller MEM_COUNTERS"
    tally_start_cluster "$dir" 3
    local replication stripes interval_ms
    replication=$(sed -n 's/^replication_factor = //p' "$dir/coordinator.toml")
    stripes=$(sed -n 's/^stripes = //p' "$dir/coordinator.toml")
    interval_ms=$(sed -n 's/^replication_interval_ms = //p' "$dir/coordinator.toml")
    [[ $interval_ms =~ ^[0-9]+$ ]] || interval_ms=1000 # the documented default
    [[ $replication == 2 ]] \
        || die "memory rows are defined for replication_factor 2; config/coordinator.toml has ${replication:-none}"
    log "tally memory cluster on $TALLY_ENDPOINT: 3 shards, replication_factor $replication, stripes $stripes"
    local entries up nodes rss_before rss_after rss_restart settle_writes settle_restart
    read -r entries up nodes <<<"$(tally_entries)"
    ((entries == 0 && up == 3)) || die "fresh memory cluster: $entries entries, $up of $nodes nodes up"
    rss_before=$(tally_shards_rss_kib)
    "$FILL" write --endpoint "$TALLY_ENDPOINT" --prefix "$MEM_PREFIX" --counters "$MEM_COUNTERS" \
        --batch 1000 --in-flight 4 >"$OUT/raw/tally_memory_fill.json" 2>"$OUT/raw/tally_memory_fill.stderr" \
        || die "filling $MEM_COUNTERS counters failed: $(cat "$OUT/raw/tally_memory_fill.stderr")"
    log "tally memory: wrote $MEM_COUNTERS counters: $(cat "$OUT/raw/tally_memory_fill.json")"
    tally_settle "tally memory, after the writes" "$interval_ms"
    settle_writes=$SETTLE_S
    # One entry per counter (each was incremented once, in one call).
    read -r entries up nodes <<<"$(tally_entries)"
    ((entries == MEM_COUNTERS)) || die "after writing $MEM_COUNTERS counters once each, status shows $entries entries"
    rss_after=$(tally_shards_rss_kib)
    # Self-check after measuring (reads allocate too): every counter is 1.
    "$FILL" check --endpoint "$TALLY_ENDPOINT" --prefix "$MEM_PREFIX" --counters "$MEM_COUNTERS" \
        --batch 10000 >>"$OUT/raw/tally_memory_fill.json" 2>"$OUT/raw/tally_memory_fill.stderr" \
        || die "read-back after the writes: $(cat "$OUT/raw/tally_memory_fill.stderr")"
    log "tally memory: shards VmRSS $rss_before -> $rss_after KiB; $entries entries; every counter reads 1"

    # Restart every shard, one after the other, on its address.
    local i pid pids=() restart_ms=()
    for ((i = 0; i < 3; i++)); do
        pid=${TALLY_SHARD_PIDS[i]}
        kill -TERM "$pid"
        local waited
        for ((waited = 0; waited < 600; waited++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && die "shard-$((i + 1)) did not stop within 60 s of SIGTERM"
        local status=0
        wait "$pid" || status=$?
        forget_pid "$pid"
        ((status == 0)) || die "shard-$((i + 1)) exited with status $status on SIGTERM; see $dir/shard-$((i + 1)).out.err"
        tally_start_shard "$dir" "$((i + 1))" "${TALLY_SHARD_ADDRESSES[i]}"
        pids+=("$TALLY_PID")
        restart_ms+=("$TALLY_START_MS")
    done
    TALLY_SHARD_PIDS=("${pids[@]}")
    log "tally memory: restarted every shard (to serving: ${restart_ms[*]} ms)"
    # The coordinator finds them up again within a probe interval.
    for ((i = 0; i < 100; i++)); do
        read -r entries up nodes <<<"$(tally_entries)"
        ((up == 3)) && break
        sleep 0.1
    done
    ((up == 3)) || die "after the restarts, $up of $nodes shards are up"
    tally_settle "tally memory, after the restarts" "$interval_ms"
    settle_restart=$SETTLE_S
    read -r entries up nodes <<<"$(tally_entries)"
    ((entries == MEM_COUNTERS)) || die "after the restarts, status shows $entries entries, expected $MEM_COUNTERS"
    rss_restart=$(tally_shards_rss_kib)
    "$FILL" check --endpoint "$TALLY_ENDPOINT" --prefix "$MEM_PREFIX" --counters "$MEM_COUNTERS" \
        --batch 10000 >>"$OUT/raw/tally_memory_fill.json" 2>"$OUT/raw/tally_memory_fill.stderr" \
        || die "read-back after the restarts: $(cat "$OUT/raw/tally_memory_fill.stderr")"
    log "tally memory: after restarting every shard, VmRSS $rss_restart KiB; every counter reads 1"

    local extra
    extra=$(printf '{"shards": 3, "replication_factor": %s, "stripes": %s, "entries": %s, "settle_s": %s, "fill": %s}' \
        "$replication" "$stripes" "$entries" "$settle_writes" "$(head -n 1 "$OUT/raw/tally_memory_fill.json")")
    helper memory "$MEMORY" tally_memory_written tally \
        "Tally, $MEM_SHOWN counters (written once each), 3 shards, replication 2, after the writes" \
        "$MEM_COUNTERS" "$rss_before" "$rss_after" \
        "(sum of shards' VmRSS after the writes and replication - sum before the writes) / counters" \
        "$extra"
    extra=$(printf '{"shards": 3, "replication_factor": %s, "stripes": %s, "entries": %s, "settle_s": %s, "restart_ms": [%s]}' \
        "$replication" "$stripes" "$entries" "$settle_restart" "$(IFS=,; echo "${restart_ms[*]}")")
    helper memory "$MEMORY" tally_memory_restarted tally \
        "Tally, $MEM_SHOWN counters, 3 shards, replication 2, after restarting every shard" \
        "$MEM_COUNTERS" "$rss_before" "$rss_restart" \
        "(sum of shards' VmRSS after restarting every shard - sum before the writes) / counters" \
        "$extra"
    local pid_left
    for pid_left in "$TALLY_COORDINATOR_PID" "${TALLY_SHARD_PIDS[@]}"; do
        stop_pid "$pid_left"
    done
}

# ---------------------------------------------------------------------------
# 3. Measurements, one system at a time so that none competes for the CPU.

log "CLIENTS=$CLIENTS DURATION=${DURATION}s MEM_COUNTERS=$MEM_COUNTERS OUT=$OUT"

# h2load's fixed concurrency: 8 connections x 8 streams (64 calls in flight).
H2_CONNECTIONS=8
H2_STREAMS=8
H2_INFLIGHT=$((H2_CONNECTIONS * H2_STREAMS))

# Build Tally first: a build failure should stop the run before the long
# measurements, and the compiler must not compete with any of them.
TALLYCTL=$REPO/target/release/tallyctl
if [[ $TALLY_SKIP != 1 ]]; then
    log "building release binaries"
    (cd "$REPO" && cargo build --release -p tally-shard -p tally-coordinator -p tally-cli) >&2
    # The ceiling server and the memory rows' writer (examples/*.rs).
    (cd "$REPO" && cargo build --release --example ceiling --example fill) >&2
    "$TALLYCTL" bench --help >/dev/null 2>&1 \
        || die "this tallyctl has no 'bench' subcommand (run with TALLY_SKIP=1 until it exists)"
fi

# Redis, every write fsynced before the reply (the durability Tally's sync
# mode gives).
start_redis always --appendonly yes --appendfsync always
redis_measure redis_one_always "Redis INCR one key, appendfsync always" 1
redis_measure redis_random_always "Redis INCR random keys (1M), appendfsync always" 0 -r 1000000
redis_measure redis_one_always_p100 "Redis INCR one key, appendfsync always, pipeline 100" 1 -P 100
stop_redis

# Redis in memory only: the upper bound of a single-threaded server.
start_redis none --appendonly no
redis_measure redis_one_none "Redis INCR one key, no persistence" 1
stop_redis

# PostgreSQL: one hot row (every client contends on its row lock) and random
# upserts over 100,000 rows (prefilled, so each is an update of a live row).
start_postgres
"${PSQL[@]}" <<'SQL'
CREATE TABLE counters (id int PRIMARY KEY, value bigint NOT NULL);
INSERT INTO counters VALUES (1, 0);
CREATE TABLE counters2 (id int PRIMARY KEY, value bigint NOT NULL);
INSERT INTO counters2 SELECT g, 0 FROM generate_series(1, 100000) AS g;
VACUUM ANALYZE;
SQL
cat >"$TMP/hot.sql" <<'SQL'
UPDATE counters SET value = value + 1 WHERE id = 1;
SQL
cat >"$TMP/upsert.sql" <<'SQL'
\set id random(1, 100000)
INSERT INTO counters2(id, value) VALUES (:id, 1) ON CONFLICT (id) DO UPDATE SET value = counters2.value + 1;
SQL
chmod 644 "$TMP/hot.sql" "$TMP/upsert.sql"

PG_PROCESSED=0
pg_hot_measure() { # ID LABEL [env...]
    local before after
    before=$("${PSQL[@]}" -c 'SELECT value FROM counters WHERE id = 1')
    pg_measure "$1" "$2" "$TMP/hot.sql" "${@:3}"
    # Self-check: the row grew by exactly the transactions pgbench counted.
    after=$("${PSQL[@]}" -c 'SELECT value FROM counters WHERE id = 1')
    ((after - before == PG_PROCESSED)) \
        || die "$2: row grew by $((after - before)), pgbench counted $PG_PROCESSED"
}
pg_hot_measure pg_one_sync "PostgreSQL UPDATE one row, synchronous_commit on"
# Make sure the option really reaches the server before trusting the figure.
[[ $(PGOPTIONS='-c synchronous_commit=off' "${PSQL[@]}" -c 'SHOW synchronous_commit') == off ]] \
    || die "PGOPTIONS did not turn synchronous_commit off"
pg_hot_measure pg_one_async "PostgreSQL UPDATE one row, synchronous_commit off" \
    PGOPTIONS='-c synchronous_commit=off'
pg_measure pg_upsert_sync "PostgreSQL upsert random rows (100k), synchronous_commit on" "$TMP/upsert.sql"
stop_postgres
PG_DATA=""

# Tally: a real cluster of separate processes, as deployed.
if [[ $TALLY_SKIP == 1 ]]; then
    log "TALLY_SKIP=1: Tally not measured"
else
    start_tally
    tally_measure tally_unary_hot "Tally unary, 1 hot counter" 1 1
    # The same calls from h2load, and from tallyctl bench at h2load's
    # concurrency (H2_CONNECTIONS connections x H2_STREAMS streams).
    bench_measure tally "$TALLY_ENDPOINT" tally_unary_hot_h2conc \
        "Tally unary, 1 hot counter, $H2_INFLIGHT calls on $H2_CONNECTIONS connections" 1 1 \
        "$H2_INFLIGHT" --connections "$H2_CONNECTIONS"
    h2load_measure tally "$TALLY_ENDPOINT" h2load_tally_hot \
        "h2load: Tally unary, 1 hot counter, $H2_CONNECTIONS conns x $H2_STREAMS streams" \
        "$H2_CONNECTIONS" "$H2_STREAMS"
    h2load_measure tally "$TALLY_ENDPOINT" h2load_tally_hot_clients \
        "h2load: Tally unary, 1 hot counter, $CLIENTS conns x 1 stream" "$CLIENTS" 1
    tally_measure tally_unary_random "Tally unary, 1M counters" 1000000 1
    tally_measure tally_batch100_hot "Tally batch 100, 1 hot counter" 1 100
    tally_measure tally_batch100_random "Tally batch 100, 1M counters" 1000000 100
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done

    # What metrics cost: the same cluster with metrics off and on (served,
    # not scraped: recording is the hot path's part), alternated twice,
    # unary and batch on one hot counter.
    for round in 1 2; do
        order="off on"
        if ((round == 2)); then
            order="on off" # neither side always runs first
        fi
        for metrics in $order; do
            # A fresh cluster each time: a restart on earlier data would
            # checkpoint it while measured.
            TALLY_METRICS=$metrics tally_start_cluster "$TMP/tally-metrics-$metrics-$round" 3
            tally_measure "tally_metrics_${metrics}_unary_$round" \
                "Tally unary, 1 hot counter, metrics $metrics ($round)" 1 1
            tally_measure "tally_metrics_${metrics}_batch100_$round" \
                "Tally batch 100, 1 hot counter, metrics $metrics ($round)" 1 100
            for pid in "${PIDS[@]}"; do
                stop_pid "$pid"
            done
        done
    done
    python3 - "$OUT/raw" >"$OUT/metrics-ab.txt" <<'PY'
import json, sys
raw = sys.argv[1]
for workload in ("unary", "batch100"):
    rate = {m: sum(json.load(open(f"{raw}/tally_metrics_{m}_{workload}_{r}.json"))["increments_per_sec"]
                   for r in (1, 2)) for m in ("off", "on")}
    print(f"metrics on/off, {workload}, 1 hot counter: {rate['on'] / rate['off']:.3f} "
          f"({rate['on'] / 2:.0f} vs {rate['off'] / 2:.0f} increments/s, mean of 2 rounds)")
PY
    while read -r line; do log "$line"; done <"$OUT/metrics-ab.txt"

    # What TLS on both hops and tokens cost: the same cluster plaintext,
    # then secure, back to back.
    for mode in plain secure; do
        secure=off
        if [[ $mode == secure ]]; then
            secure=on
        fi
        TALLY_SECURE=$secure tally_start_cluster "$TMP/tally-tls-$mode" 3
        tally_measure "tally_tls_${mode}_unary" "Tally unary, 1 hot counter, $mode" 1 1
        tally_measure "tally_tls_${mode}_batch100" "Tally batch 100, 1 hot counter, $mode" 1 100
        for pid in "${PIDS[@]}"; do
            stop_pid "$pid"
        done
        unset TALLY_CA_CERT TALLY_TOKEN
    done
    python3 - "$OUT/raw" >"$OUT/secure-ab.txt" <<'PY'
import json, sys
raw = sys.argv[1]
for workload in ("unary", "batch100"):
    rate = {m: json.load(open(f"{raw}/tally_tls_{m}_{workload}.json"))["increments_per_sec"]
            for m in ("plain", "secure")}
    print(f"secure/plain, {workload}, 1 hot counter: {rate['secure'] / rate['plain']:.3f} "
          f"({rate['secure']:.0f} vs {rate['plain']:.0f} increments/s)")
PY
    while read -r line; do log "$line"; done <"$OUT/secure-ab.txt"

    # The same unary calls with durability = "async": what sync durability
    # costs, side by side.
    start_tally async
    bench_measure tally "$TALLY_ENDPOINT" tally_async_unary_hot \
        "Tally unary, 1 hot counter, async" 1 1 "$CLIENTS"
    h2load_measure tally "$TALLY_ENDPOINT" h2load_tally_async_hot \
        "h2load: Tally unary, 1 hot counter, async, $H2_CONNECTIONS conns x $H2_STREAMS streams" \
        "$H2_CONNECTIONS" "$H2_STREAMS"
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done

    # The ceiling: the same unary calls against an in-memory server on the
    # same stack, so Tally's figures read as a fraction of what the stack
    # allows on this machine.
    start_ceiling
    bench_measure ceiling "$CEILING_ENDPOINT" ceiling_unary_hot "Ceiling unary, 1 hot counter" \
        1 1 "$CLIENTS"
    bench_measure ceiling "$CEILING_ENDPOINT" ceiling_unary_hot_h2conc \
        "Ceiling unary, 1 hot counter, $H2_INFLIGHT calls on $H2_CONNECTIONS connections" 1 1 \
        "$H2_INFLIGHT" --connections "$H2_CONNECTIONS"
    h2load_measure ceiling "$CEILING_ENDPOINT" h2load_ceiling_hot \
        "h2load: Ceiling unary, 1 hot counter, $H2_CONNECTIONS conns x $H2_STREAMS streams" \
        "$H2_CONNECTIONS" "$H2_STREAMS"
    h2load_measure ceiling "$CEILING_ENDPOINT" h2load_ceiling_hot_clients \
        "h2load: Ceiling unary, 1 hot counter, $CLIENTS conns x 1 stream" "$CLIENTS" 1
    bench_measure ceiling "$CEILING_ENDPOINT" ceiling_unary_random "Ceiling unary, 1M counters" \
        1000000 1 "$CLIENTS"
    stop_pid "$CEILING_PID"
fi

# Memory per counter: Redis, then Tally (each alone on the machine).
redis_memory
if [[ $TALLY_SKIP != 1 ]]; then
    tally_memory
fi

# ---------------------------------------------------------------------------
# 4-5. Machine, results, table, chart.

export CMP_NPROC CMP_FREE CMP_CPU CMP_REDIS CMP_PG CMP_GIT CMP_DIRTY CMP_DATE CMP_KERNEL CMP_H2LOAD
CMP_H2LOAD=$(h2load --version | head -n 1)
CMP_NPROC=$(nproc)
CMP_FREE=$(free -g)
CMP_CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
CMP_REDIS=$(redis-server --version)
CMP_PG=$("$PG_BIN/postgres" --version)
CMP_GIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
CMP_DIRTY=$([[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]] && echo true || echo false)
CMP_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CMP_KERNEL=$(uname -r)

python3 - "$MEASUREMENTS" "$OUT" "$CLIENTS" "$DURATION" "$TALLY_SKIP" "$MEMORY" \
    "$H2_CONNECTIONS" "$H2_STREAMS" <<'PY'
import json, os, sys

path, out, clients, duration, tally_skip, memory_path, h2c, h2m = sys.argv[1:]
measurements = [json.loads(line) for line in open(path) if line.strip()]
memory = [json.loads(line) for line in open(memory_path) if line.strip()]
by_id = {m["id"]: m for m in measurements}
memory_by_id = {m["id"]: m for m in memory}
env = os.environ
machine = {
    "nproc": int(env["CMP_NPROC"]),
    "cpu_model": env["CMP_CPU"],
    "free_g": env["CMP_FREE"],
    "kernel": env["CMP_KERNEL"],
    "redis_version": env["CMP_REDIS"],
    "postgres_version": env["CMP_PG"],
    "git_rev": env["CMP_GIT"],
    "git_dirty": env["CMP_DIRTY"] == "true",
    "date": env["CMP_DATE"],
    "h2load_version": env["CMP_H2LOAD"],
}

def ratio(label, num_id, num_field, den_id, den_field):
    num, den = by_id.get(num_id), by_id.get(den_id)
    value = None
    if num and den and num[num_field] and den[den_field]:
        value = num[num_field] / den[den_field]
    return {"label": label, "numerator": f"{num_id}.{num_field}",
            "denominator": f"{den_id}.{den_field}", "value": value}

ratios = [
    ratio("Tally unary hot / Redis one key (always)", "tally_unary_hot", "ops_per_sec",
          "redis_one_always", "ops_per_sec"),
    ratio("Tally unary 1M counters / Redis random keys (always)", "tally_unary_random",
          "ops_per_sec", "redis_random_always", "ops_per_sec"),
    ratio("Tally batch 100 increments/s / Redis pipeline 100 (always)", "tally_batch100_hot",
          "increments_per_sec", "redis_one_always_p100", "ops_per_sec"),
    ratio("Tally unary hot / PostgreSQL one row (sync commit)", "tally_unary_hot",
          "ops_per_sec", "pg_one_sync", "ops_per_sec"),
    # What sync durability costs (the same cluster, async).
    ratio("Tally unary hot, sync / async (tallyctl bench)", "tally_unary_hot", "ops_per_sec",
          "tally_async_unary_hot", "ops_per_sec"),
    ratio(f"Tally unary hot, sync / async (h2load, {h2c} conns x {h2m} streams)",
          "h2load_tally_hot", "ops_per_sec", "h2load_tally_async_hot", "ops_per_sec"),
    # Tally against the ceiling (the same stack, in memory, one hop).
    ratio("Tally unary hot / ceiling unary hot (tallyctl bench)", "tally_unary_hot",
          "ops_per_sec", "ceiling_unary_hot", "ops_per_sec"),
    ratio("Tally unary 1M counters / ceiling unary 1M counters (tallyctl bench)",
          "tally_unary_random", "ops_per_sec", "ceiling_unary_random", "ops_per_sec"),
    ratio(f"Tally unary hot / ceiling unary hot (h2load, {h2c} conns x {h2m} streams)",
          "h2load_tally_hot", "ops_per_sec", "h2load_ceiling_hot", "ops_per_sec"),
    ratio(f"Tally unary hot / ceiling unary hot (h2load, {clients} conns x 1 stream)",
          "h2load_tally_hot_clients", "ops_per_sec", "h2load_ceiling_hot_clients",
          "ops_per_sec"),
    # The load generators against each other, same server, same concurrency.
    ratio(f"h2load / tallyctl bench, Tally, {int(h2c) * int(h2m)} calls on {h2c} connections",
          "h2load_tally_hot", "ops_per_sec", "tally_unary_hot_h2conc", "ops_per_sec"),
    ratio(f"h2load / tallyctl bench, Tally, {clients} calls on {clients} connections",
          "h2load_tally_hot_clients", "ops_per_sec", "tally_unary_hot", "ops_per_sec"),
    ratio(f"h2load / tallyctl bench, ceiling, {int(h2c) * int(h2m)} calls on {h2c} connections",
          "h2load_ceiling_hot", "ops_per_sec", "ceiling_unary_hot_h2conc", "ops_per_sec"),
    ratio(f"h2load / tallyctl bench, ceiling, {clients} calls on {clients} connections",
          "h2load_ceiling_hot_clients", "ops_per_sec", "ceiling_unary_hot", "ops_per_sec"),
]

def memory_ratio(label, num_id, den_id, den_field="bytes_per_counter"):
    num, den = memory_by_id.get(num_id), memory_by_id.get(den_id)
    value = None
    if num and den and den.get(den_field):
        value = num["bytes_per_counter"] / den[den_field]
    return {"label": label, "numerator": f"{num_id}.bytes_per_counter",
            "denominator": f"{den_id}.{den_field}", "value": value}

memory_ratios = [
    memory_ratio("Tally after the writes / Redis (RSS per counter)",
                 "tally_memory_written", "redis_memory"),
    memory_ratio("Tally after restarting every shard / Redis (RSS per counter)",
                 "tally_memory_restarted", "redis_memory"),
    memory_ratio("Tally after restarting every shard / Redis used_memory per key",
                 "tally_memory_restarted", "redis_memory", "used_memory_bytes_per_counter"),
]
results = {
    "settings": {"clients": int(clients), "duration_s": int(duration),
                 "tally_skipped": tally_skip == "1",
                 "h2load_connections": int(h2c), "h2load_streams": int(h2m)},
    "machine": machine,
    "measurements": measurements,
    "ratios": ratios,
    "memory": memory,
    "memory_ratios": memory_ratios,
}
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")

def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"

lines = [
    f"# Tally vs Redis vs PostgreSQL (and a ceiling): increments, {clients} clients, "
    f"{duration} s each",
    "",
    f"{machine['date']}, git {machine['git_rev'][:12]}{' (dirty)' if machine['git_dirty'] else ''}; "
    f"{machine['nproc']} CPUs ({machine['cpu_model']}), kernel {machine['kernel']}; "
    f"{machine['redis_version']}; {machine['postgres_version']}; {machine['h2load_version']}. "
    "Load generators run on the same machine as the servers. "
    "Ceiling: examples/ceiling.rs, an in-memory tally.v1.Counter server on the "
    "coordinator's stack (one hop, no disk). h2load rows: unary Increment, a fixed "
    "number of calls sized to last about the duration, checked against the counter.",
    "",
    "| Measurement | ops/s | increments/s | p50 ms | p99 ms |",
    "| --- | ---: | ---: | ---: | ---: |",
]
for m in measurements:
    lat = m["latency_ms"]
    lines.append(f"| {m['label']} | {fmt(m['ops_per_sec'])} | {fmt(m['increments_per_sec'])} "
                 f"| {fmt(lat['p50'], 2)} | {fmt(lat['p99'], 2)} |")
lines += ["", "| Ratio | value |", "| --- | ---: |"]
for r in ratios:
    shown = "n/a" if r["value"] is None else f"{r['value']:.2f}x"
    lines.append(f"| {r['label']} | {shown} |")
if memory:
    lines += [
        "",
        "Memory per counter, each counter written once: bytes per counter = "
        "(VmRSS after - VmRSS before the writes) / counters; Tally's VmRSS is "
        "summed over its shard processes (the coordinator holds no counters).",
        "",
        "| Memory | counters | VmRSS before KiB | VmRSS after KiB | bytes/counter | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in memory:
        if m["system"] == "redis":
            note = (f"INFO used_memory {m['used_memory_before']:,} -> "
                    f"{m['used_memory_after']:,} B: {m['used_memory_bytes_per_counter']:.0f} B/key")
        else:
            note = (f"{m['entries']:,} entries, stripes {m['stripes']}, "
                    f"settled {m['settle_s']} s")
            if "restart_ms" in m:
                note += ", restarts to serving " + "/".join(str(x) for x in m["restart_ms"]) + " ms"
        lines.append(f"| {m['label']} | {m['counters']:,} | {m['rss_before_kib']:,} "
                     f"| {m['rss_after_kib']:,} | {m['bytes_per_counter']:,.0f} | {note} |")
    lines += ["", "| Memory ratio | value |", "| --- | ---: |"]
    for r in memory_ratios:
        shown = "n/a" if r["value"] is None else f"{r['value']:.2f}x"
        lines.append(f"| {r['label']} | {shown} |")
lines += ["", "```", "$ free -g", machine["free_g"], "```", ""]
text = "\n".join(lines)
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
print(text)
PY

python3 "$REPO/benches/chart.py" "$OUT/results.json" "$OUT/compare.svg"
log "wrote $OUT/results.json, $OUT/results.md, $OUT/compare.svg (raw output in $OUT/raw/)"
