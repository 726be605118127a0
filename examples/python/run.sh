#!/usr/bin/env bash
# Generates Python stubs from proto/tally/v1/tally.proto with grpcio-tools and
# runs concurrent_writers.py against a running cluster (default
# 127.0.0.1:7700, e.g. `cargo tallyctl dev`). Extra arguments go to the script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${TALLY_PYTHON_VENV:-$here/.venv}

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools

generated=$here/generated
mkdir -p "$generated"
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$generated" --grpc_python_out="$generated" \
  "$root/proto/tally/v1/tally.proto"

PYTHONPATH=$generated exec "$venv/bin/python" "$here/concurrent_writers.py" \
  --endpoint "${TALLY_ENDPOINT:-127.0.0.1:7700}" "$@"
