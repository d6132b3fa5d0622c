#!/usr/bin/env bash
# Installs what the flotilla-sim conformance tests need beyond cargo:
#   - $REPO/.venv with the official `openai` Python SDK and pytest
#     (used by sim/tests/openai_sdk.rs, which runs sim/tests/openai_conformance.py);
#   - `promtool` (Debian package `prometheus`), only if it is not already on PATH
#     (used by sim/tests/promtool.rs to run `promtool check metrics` on /metrics).
# Idempotent: a second run only checks. Needs PyPI and Debian's package mirror.
# Usage: bash .ci/sim-deps.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
# shellcheck source=.ci/venv.sh
. "$REPO/.ci/venv.sh"

ensure_venv_packages sim-deps 'import openai, pytest' 'openai>=1.40' 'pytest>=8'
"$VENV/bin/python" -c 'import openai; print("sim-deps: openai", openai.__version__)'

if ! command -v promtool >/dev/null 2>&1; then
    echo "sim-deps: promtool missing; installing Debian package prometheus (it ships /usr/bin/promtool)"
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a Prometheus service where systemd runs; the tests need only promtool.
fi
command -v promtool >/dev/null 2>&1 || { echo "sim-deps: promtool still missing after install" >&2; exit 1; }
echo "sim-deps: $(promtool --version 2>&1 | head -1)"
