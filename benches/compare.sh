#!/usr/bin/env bash
# benches/compare.sh: Tally against Redis and PostgreSQL doing the same job,
# counting increments, on this machine, with the same number of clients.
#
# Usage (from anywhere; paths are resolved against the repository):
#   benches/compare.sh                      # CLIENTS=64, DURATION=10 seconds
#   CLIENTS=32 DURATION=3 benches/compare.sh
#   TALLY_SKIP=1 benches/compare.sh         # Redis and PostgreSQL only
#
# Environment:
#   CLIENTS     concurrent connections / client tasks for every tool (64)
#   DURATION    seconds each measurement runs (10)
#   OUT         output directory (target/compare in the repository)
#   TALLY_SKIP  1: skip building and measuring Tally
#   READS       --reads passed to `tallyctl bench` (0: increments only, as
#               the Redis and PostgreSQL runs only write)
#   KEEP_TMP    1: keep the temporary directory (logs, data) for inspection
#
# What it does: installs redis-server and postgresql from Debian when missing,
# starts private servers on free loopback ports with their data in a fresh
# temporary directory (never the system services), measures, stops every
# process it started (exit trap), and writes OUT/results.json,
# OUT/results.md and OUT/compare.svg (benches/chart.py), plus the raw output
# of every tool in OUT/raw/.
#
# Everything runs on one machine: the load generators share the CPU with the
# server they measure, for every system alike.

set -euo pipefail

CLIENTS=${CLIENTS:-64}
DURATION=${DURATION:-10}
TALLY_SKIP=${TALLY_SKIP:-0}
READS=${READS:-0}
KEEP_TMP=${KEEP_TMP:-0}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/target/compare}

[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || { echo "CLIENTS must be a positive integer" >&2; exit 2; }
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "DURATION must be a positive integer (seconds)" >&2; exit 2; }

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
    local kept=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$pid" ]] || kept+=("$p")
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
if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

PG_BIN=$(pg_bin_dir) || die "no PostgreSQL server under /usr/lib/postgresql/*/bin"
command -v python3 >/dev/null || die "python3 is needed (results and chart)"

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

def record(path, ident, system, label, ops, incs, p50, p99, command, extra_json=""):
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
            entry["tally"] = json.load(f)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")

def tally_field(path, field):
    with open(path) as f:
        data = json.load(f)
    value = data
    for part in field.split("."):
        value = value[part]
    print(value)

command, args = sys.argv[1], sys.argv[2:]
{"redis-csv": redis_csv, "pg-latency": pg_latency, "record": record,
 "tally-field": tally_field}[command](*args)
PY
helper() { python3 "$HELPER" "$@"; }

# A free loopback port: bind port 0 and report what the kernel picked.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
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

start_tally() {
    tally_start_cluster "$TMP/tally" 3
    log "tally coordinator on $TALLY_ENDPOINT (3 shards at ${TALLY_SHARD_ADDRESSES[*]}, durability sync)"
}

tally_measure() { # ID LABEL COUNTERS BATCH
    local id=$1 label=$2 counters=$3 batch=$4
    local cmd=("$TALLYCTL" --endpoint "$TALLY_ENDPOINT" --json bench --clients "$CLIENTS"
        --duration "${DURATION}s" --counters "$counters" --batch "$batch" --reads "$READS")
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
    helper record "$MEASUREMENTS" "$id" tally "$label" "$ops" "$incs" "$p50" "$p99" \
        "tallyctl --endpoint ADDR --json bench --clients $CLIENTS --duration ${DURATION}s --counters $counters --batch $batch --reads $READS" \
        "$OUT/raw/$id.json"
    local errors
    errors=$(helper tally-field "$OUT/raw/$id.json" errors 2>/dev/null || echo "?")
    if [[ $errors != 0 ]]; then
        # The read-back check passed, so nothing acknowledged was lost, but
        # failed calls mean the figure is not clean: say so.
        log "WARNING: $label: $errors calls failed (see $OUT/raw/$id.json)"
    fi
    log "$(printf '%s: %.0f calls/s, %.0f increments/s' "$label" "$ops" "$incs")"
}

# ---------------------------------------------------------------------------
# 3. Measurements, one system at a time so that none competes for the CPU.

log "CLIENTS=$CLIENTS DURATION=${DURATION}s OUT=$OUT"

# Build Tally first: a build failure should stop the run before the long
# measurements, and the compiler must not compete with any of them.
TALLYCTL=$REPO/target/release/tallyctl
if [[ $TALLY_SKIP != 1 ]]; then
    log "building release binaries"
    (cd "$REPO" && cargo build --release -p tally-shard -p tally-coordinator -p tally-cli) >&2
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
    tally_measure tally_unary_random "Tally unary, 1M counters" 1000000 1
    tally_measure tally_batch100_hot "Tally batch 100, 1 hot counter" 1 100
    tally_measure tally_batch100_random "Tally batch 100, 1M counters" 1000000 100
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
fi

# ---------------------------------------------------------------------------
# 4-5. Machine, results, table, chart.

export CMP_NPROC CMP_FREE CMP_CPU CMP_REDIS CMP_PG CMP_GIT CMP_DIRTY CMP_DATE CMP_KERNEL
CMP_NPROC=$(nproc)
CMP_FREE=$(free -g)
CMP_CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
CMP_REDIS=$(redis-server --version)
CMP_PG=$("$PG_BIN/postgres" --version)
CMP_GIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
CMP_DIRTY=$([[ -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]] && echo true || echo false)
CMP_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CMP_KERNEL=$(uname -r)

python3 - "$MEASUREMENTS" "$OUT" "$CLIENTS" "$DURATION" "$TALLY_SKIP" <<'PY'
import json, os, sys

path, out, clients, duration, tally_skip = sys.argv[1:]
measurements = [json.loads(line) for line in open(path) if line.strip()]
by_id = {m["id"]: m for m in measurements}
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
]
results = {
    "settings": {"clients": int(clients), "duration_s": int(duration),
                 "tally_skipped": tally_skip == "1"},
    "machine": machine,
    "measurements": measurements,
    "ratios": ratios,
}
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")

def fmt(value, digits=0):
    return "-" if value is None else f"{value:,.{digits}f}"

lines = [
    f"# Tally vs Redis vs PostgreSQL: increments, {clients} clients, {duration} s each",
    "",
    f"{machine['date']}, git {machine['git_rev'][:12]}{' (dirty)' if machine['git_dirty'] else ''}; "
    f"{machine['nproc']} CPUs ({machine['cpu_model']}), kernel {machine['kernel']}; "
    f"{machine['redis_version']}; {machine['postgres_version']}. "
    "Load generators run on the same machine as the servers.",
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
lines += ["", "```", "$ free -g", machine["free_g"], "```", ""]
text = "\n".join(lines)
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
print(text)
PY

python3 "$REPO/benches/chart.py" "$OUT/results.json" "$OUT/compare.svg"
log "wrote $OUT/results.json, $OUT/results.md, $OUT/compare.svg (raw output in $OUT/raw/)"
