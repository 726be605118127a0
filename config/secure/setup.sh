#!/usr/bin/env bash
# Makes what config/secure/ runs with: the cluster's CA, a certificate for
# the coordinator and for each shard (valid for its compose service name
# too), and a tokens file with one admin token, which it prints once.
#
#   config/secure/setup.sh            # from the repository's root
#
# Nothing that exists is replaced: run it again to add what is missing.
# Keep certs/ca.key off the nodes in production; it only signs.
set -euo pipefail
cd "$(dirname "$0")"
tallyctl() { cargo run --quiet --release -p tally-cli --bin tallyctl -- "$@"; }

if [[ ! -f certs/ca.crt ]]; then
  tallyctl certs create-ca --certs-dir certs
fi
for node in coordinator shard-1 shard-2 shard-3; do
  if [[ ! -f certs/$node.crt ]]; then
    tallyctl certs create-node --certs-dir certs "$node"
  fi
done
if [[ ! -f tokens.toml ]]; then
  echo "admin token (shown once; the file keeps only its hash):"
  tallyctl tokens create --tokens-file tokens.toml --name admin --role admin
fi
