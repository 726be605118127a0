# shellcheck shell=bash disable=SC2034  # sets variables for the caller
# benches/tally-cluster.sh: a Tally cluster of real processes on loopback,
# for compare.sh and scale.sh. Sourced, not run. The caller defines REPO,
# a PIDS array (every process started here is added; the caller's exit trap
# stops them) and die MESSAGE.
#
# Configs are the repository's config/shard-1.toml and
# config/coordinator.toml with ids, addresses (metrics too, each on a free
# port: served, as in production; TALLY_METRICS=off serves none), data
# directories and any given keys rewritten. With TALLY_SECURE=on the cluster
# runs as config/secure/ does: TLS on every port, mutual TLS to the shards
# and an admin token (certificates and token made with the release tallyctl
# under DIR/certs; TALLY_CA_CERT and TALLY_TOKEN are exported, so tallyctl
# calls it over TLS with the token). Every server listens on port 0 and is found by the
# `listening on ADDRESS` line it prints once it serves, so there is no race
# between picking a port and binding it, and no sleep decides readiness.

# Waits for a daemon's `listening on ADDRESS` line and prints ADDRESS.
tally_wait_listening() { # PID STDOUT_FILE NAME
    local pid=$1 file=$2 name=$3 line i
    for ((i = 0; i < 6000; i++)); do
        line=$(grep -m 1 '^listening on ' "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            echo "${line#listening on }"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$name exited before listening: $(tail -n 5 "$file.err")"
        sleep 0.01
    done
    die "$name not listening after 60 s"
}

# Makes DIR/certs (a CA, a certificate for the coordinator and for 16
# shards) and DIR/tokens.toml with an admin token, once per DIR, and
# exports TALLY_CA_CERT and TALLY_TOKEN for tallyctl.
tally_secure_files() { # DIR
    local dir=$1 tallyctl="$REPO/target/release/tallyctl" node
    if [[ ! -f $dir/certs/ca.crt ]]; then
        "$tallyctl" certs create-ca --certs-dir "$dir/certs" >/dev/null
        for node in coordinator shard-{1..16}; do
            "$tallyctl" certs create-node --certs-dir "$dir/certs" "$node" >/dev/null
        done
        "$tallyctl" tokens create --tokens-file "$dir/tokens.toml" --name bench --role admin \
            >"$dir/token" 2>/dev/null
    fi
    export TALLY_CA_CERT=$dir/certs/ca.crt
    TALLY_TOKEN=$(cat "$dir/token")
    export TALLY_TOKEN
}

# Starts shard-I with its data in DIR/data/shard-I, listening on ADDRESS
# (127.0.0.1:0: a free port), with TALLY_DURABILITY (default sync). Sets TALLY_PID, TALLY_ADDRESS and
# TALLY_START_MS (from launch to serving, which includes recovery).
tally_start_shard() { # DIR I ADDRESS
    local dir=$1 i=$2 address=$3 begin
    local metrics='s|^metrics_listen = .*|metrics_listen = "127.0.0.1:0"|'
    if [[ ${TALLY_METRICS:-on} == off ]]; then
        metrics='/^metrics_listen = /d'
    fi
    sed -e "s|^node_id = .*|node_id = \"shard-$i\"|" \
        -e "s|^listen = .*|listen = \"$address\"|" \
        -e "$metrics" \
        -e "s|^data_dir = .*|data_dir = \"$dir/data/shard-$i\"|" \
        -e "s|^durability = .*|durability = \"${TALLY_DURABILITY:-sync}\"|" \
        "$REPO/config/shard-1.toml" >"$dir/shard-$i.toml"
    grep -q "^data_dir = \"$dir/data/shard-$i\"" "$dir/shard-$i.toml" \
        || die "config/shard-1.toml has no data_dir line to rewrite"
    local tls=()
    if [[ ${TALLY_SECURE:-off} == on ]]; then
        tally_secure_files "$dir"
        tls=(--tls-cert "$dir/certs/shard-$i.crt" --tls-key "$dir/certs/shard-$i.key"
            --tls-ca "$dir/certs/ca.crt")
    fi
    begin=$(date +%s%N)
    (cd "$dir" && exec env ${SHARD_ENV:-} "$REPO/target/release/tally-shard" --config "$dir/shard-$i.toml" "${tls[@]}") \
        >"$dir/shard-$i.out" 2>"$dir/shard-$i.out.err" &
    TALLY_PID=$!
    PIDS+=("$TALLY_PID")
    TALLY_ADDRESS=$(tally_wait_listening "$TALLY_PID" "$dir/shard-$i.out" "shard-$i")
    TALLY_START_MS=$((($(date +%s%N) - begin) / 1000000))
}

# Starts SHARDS shard nodes and a coordinator under DIR. KEY=VALUE
# arguments set coordinator keys (values as TOML: stripes=1). Sets
# TALLY_ENDPOINT, TALLY_COORDINATOR_PID, and the arrays TALLY_SHARD_PIDS and
# TALLY_SHARD_ADDRESSES.
tally_start_cluster() { # DIR SHARDS [KEY=VALUE...]
    local dir=$1 shards=$2 i nodes=""
    shift 2
    mkdir -p "$dir"
    TALLY_SHARD_PIDS=()
    TALLY_SHARD_ADDRESSES=()
    for ((i = 1; i <= shards; i++)); do
        tally_start_shard "$dir" "$i" 127.0.0.1:0
        TALLY_SHARD_PIDS+=("$TALLY_PID")
        TALLY_SHARD_ADDRESSES+=("$TALLY_ADDRESS")
        nodes+=$(printf '\n[[nodes]]\nid = "shard-%s"\naddress = "%s"\nweight = 1\n' "$i" "$TALLY_ADDRESS")
        nodes+=$'\n'
    done
    # The repository's coordinator.toml up to its [[nodes]] list, with the
    # given keys replaced (or added), then the shards just started.
    local overrides
    local metrics='metrics_listen="127.0.0.1:0"'
    if [[ ${TALLY_METRICS:-on} == off ]]; then
        metrics=''
    fi
    overrides=$(printf '%s\n' 'listen="127.0.0.1:0"' "$metrics" "$@")
    awk -v overrides="$overrides" '
        BEGIN {
            n = split(overrides, lines, "\n")
            for (i = 1; i <= n; i++) {
                if (lines[i] == "") continue
                eq = index(lines[i], "=")
                value[substr(lines[i], 1, eq - 1)] = substr(lines[i], eq + 1)
            }
        }
        /^\[\[nodes\]\]/ { exit }
        {
            key = $1
            if ($2 == "=" && (key in value)) {
                print key " = " value[key]
                done[key] = 1
                next
            }
            print
        }
        END { for (key in value) if (!(key in done)) print key " = " value[key] }
    ' "$REPO/config/coordinator.toml" >"$dir/coordinator.toml"
    if [[ ${TALLY_METRICS:-on} == off ]]; then
        sed -i '/^metrics_listen = /d' "$dir/coordinator.toml"
    fi
    printf '%s' "$nodes" >>"$dir/coordinator.toml"
    local tls=()
    if [[ ${TALLY_SECURE:-off} == on ]]; then
        tally_secure_files "$dir"
        tls=(--tls-cert "$dir/certs/coordinator.crt" --tls-key "$dir/certs/coordinator.key"
            --tls-ca "$dir/certs/ca.crt" --tokens-file "$dir/tokens.toml")
    fi
    (cd "$dir" && exec "$REPO/target/release/tally-coordinator" --config "$dir/coordinator.toml" "${tls[@]}") \
        >"$dir/coordinator.out" 2>"$dir/coordinator.out.err" &
    TALLY_COORDINATOR_PID=$!
    PIDS+=("$TALLY_COORDINATOR_PID")
    TALLY_ENDPOINT=$(tally_wait_listening "$TALLY_COORDINATOR_PID" "$dir/coordinator.out" coordinator)
}

# Stops the cluster started last (SIGTERM: a clean stop) and waits for it.
tally_stop_cluster() {
    local pid
    for pid in "${TALLY_SHARD_PIDS[@]}" "$TALLY_COORDINATOR_PID"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${TALLY_SHARD_PIDS[@]}" "$TALLY_COORDINATOR_PID"; do
        wait "$pid" 2>/dev/null || true
    done
}
