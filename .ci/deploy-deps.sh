#!/usr/bin/env bash
# Installs what the deploy/ checks need beyond cargo: python-hcl2 in $REPO/.venv, which
# cli/tests/deploy_files.rs uses (through deploy/nomad/check.py) to parse the Nomad job specs.
# Idempotent. Usage: bash .ci/deploy-deps.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=.ci/venv.sh
. "$REPO/.ci/venv.sh"
ensure_venv_packages deploy-deps 'import hcl2' 'python-hcl2>=7'
