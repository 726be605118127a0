#!/usr/bin/env bash
# Installs requirements.txt into a venv, generates Python stubs from
# proto/tally/v1/tally.proto with grpcio-tools and runs an example against a
# running cluster (default 127.0.0.1:7700, e.g. `cargo tallyctl dev`):
#
#   run.sh [SCRIPT.py] [ARGS...]
#   run.sh --install-only        # the venv and the stubs, no script
#
# SCRIPT.py is a file of this directory, concurrent_writers.py when the first
# argument is not one; ARGS go to the script (--endpoint overrides
# TALLY_ENDPOINT). The venv is installed again only when requirements.txt
# changes.
#
# Environment: TALLY_ENDPOINT; TALLY_PYTHON_VENV (default ./.venv) and
# TALLY_PYTHON_GENERATED (default ./generated) place the venv and the stubs
# elsewhere (the integration test keeps them under target/). Exits 3 if the
# venv or the stubs cannot be made, else with the script's status.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${TALLY_PYTHON_VENV:-$here/.venv}
generated=${TALLY_PYTHON_GENERATED:-$here/generated}

install_only=false
if [ "${1:-}" = --install-only ]; then
  install_only=true
  shift
fi
script=concurrent_writers.py
fail() {
  echo "run.sh: $*" >&2
  exit 3
}

if [ $# -gt 0 ] && [[ $1 == *.py ]]; then
  script=$(basename "$1")
  shift
  [ -f "$here/$script" ] || fail "no $script in $here"
fi

mkdir -p "$(dirname "$venv")"
# Two runs at once (two test binaries, two terminals) take turns installing.
if command -v flock >/dev/null; then
  exec 9>"$venv.lock"
  flock 9
fi
if ! cmp -s "$here/requirements.txt" "$venv/installed-requirements.txt"; then
  # Never removed: TALLY_PYTHON_VENV may be a venv of the caller's own.
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || fail "python3 -m venv $venv failed (on Debian: apt-get install python3-venv)"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" ||
    fail "pip install -r requirements.txt failed (its output is above; is PyPI reachable?)"
  cp "$here/requirements.txt" "$venv/installed-requirements.txt"
fi

mkdir -p "$generated"
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$generated" --grpc_python_out="$generated" \
  "$root/proto/tally/v1/tally.proto" || fail "generating the stubs failed"
if command -v flock >/dev/null; then
  exec 9>&-
fi
if $install_only; then
  exit 0
fi

PYTHONPATH=$generated exec "$venv/bin/python" "$here/$script" \
  --endpoint "${TALLY_ENDPOINT:-127.0.0.1:7700}" "$@"
