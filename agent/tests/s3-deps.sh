#!/usr/bin/env bash
# Installs what the flotilla-agent S3 download test (agent/tests/s3_download.rs) needs beyond
# cargo: `moto[server]` (a local S3-compatible server, with boto3) in $REPO/.venv.
# Idempotent: a second run only checks. Needs PyPI.
# Usage: bash agent/tests/s3-deps.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "s3-deps: creating venv at $VENV"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import moto.server, boto3' >/dev/null 2>&1; then
    echo "s3-deps: installing moto[server] into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'moto[server]>=5'
fi
"$VENV/bin/python" -c 'import moto; print("s3-deps: moto", moto.__version__)'
