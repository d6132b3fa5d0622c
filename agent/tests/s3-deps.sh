#!/usr/bin/env bash
# Installs what the flotilla-agent S3 download test (agent/tests/s3_download.rs) needs beyond
# cargo: `moto[server]` (a local S3-compatible server, with boto3) in $REPO/.venv.
# Idempotent: a second run only checks. Needs PyPI.
# Usage: bash agent/tests/s3-deps.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"
# shellcheck source=../../.ci/venv.sh
. "$REPO/.ci/venv.sh"

ensure_venv_packages s3-deps 'import moto.server, boto3' 'moto[server]>=5'
"$VENV/bin/python" -c 'import moto; print("s3-deps: moto", moto.__version__)'
