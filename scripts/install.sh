#!/usr/bin/env bash
# Create ./.venv and install bids_postop into it.  Usage: scripts/install.sh [test]
#   torch is installed first and explicitly: left to pip's resolver, nnU-Net's dependency chain pulls a
#   torchvision that does not match torch (see ../shared/ENVIRONMENT.md). Override with TORCH_SPEC, always as a
#   torch + torchvision pair, e.g. the CPU-only build from PyTorch's index (PyPI's x86_64 torch is the CUDA build):
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC
# the torch (and torchvision) just installed stay: nothing the package pulls in may replace them with another
# build (e.g. PyPI's CUDA build in place of a CPU one)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -E '^(torch|torchvision)==' >"$constraints" || true
.venv/bin/python -m pip install -q -c "$constraints" -e ".${extra}"
.venv/bin/python -m pip check
echo "installed: $(.venv/bin/bids_postop --version)"
