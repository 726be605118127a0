#!/usr/bin/env bash
# Installs package-lock.json's dependencies (`npm ci`) and runs an example
# against a running cluster (default 127.0.0.1:7700, e.g. `cargo tallyctl
# dev`). The proto is loaded at run time; nothing is generated.
#
#   run.sh [SCRIPT.js] [ARGS...]
#   run.sh --install-only        # node_modules, no script
#
# SCRIPT.js is a file of this directory, rate_limiter.js when the first
# argument is not one; ARGS go to the script (--endpoint overrides
# TALLY_ENDPOINT). Installs again only when package-lock.json changes.
#
# Environment: TALLY_ENDPOINT; TALLY_NODE_PREFIX (default: this directory)
# is where node_modules goes (the integration test keeps it under target/).
# Exits 3 if the dependencies cannot be installed, else with the script's
# status.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${TALLY_NODE_PREFIX:-$here}

fail() {
  echo "run.sh: $*" >&2
  exit 3
}

install_only=false
if [ "${1:-}" = --install-only ]; then
  install_only=true
  shift
fi
script=rate_limiter.js
if [ $# -gt 0 ] && [[ $1 == *.js ]]; then
  script=$(basename "$1")
  shift
  [ -f "$here/$script" ] || fail "no $script in $here"
fi

mkdir -p "$prefix"
# Two runs at once (two test binaries, two terminals) take turns installing.
if command -v flock >/dev/null; then
  exec 9>"$prefix/.install.lock"
  flock 9
fi
stamp=$prefix/node_modules/.installed-package-lock.json
if ! cmp -s "$here/package-lock.json" "$stamp"; then
  if [ "$prefix" != "$here" ]; then
    cp "$here/package.json" "$here/package-lock.json" "$prefix/"
  fi
  (cd "$prefix" && npm ci --no-audit --no-fund --loglevel=error) ||
    fail "npm ci failed (its output is above; is the npm registry reachable?)"
  cp "$here/package-lock.json" "$stamp"
fi
if command -v flock >/dev/null; then
  exec 9>&-
fi
if $install_only; then
  exit 0
fi

NODE_PATH=$prefix/node_modules exec node "$here/$script" \
  --endpoint "${TALLY_ENDPOINT:-127.0.0.1:7700}" "$@"
