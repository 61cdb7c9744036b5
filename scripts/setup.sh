#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv (or the active one), torch only when
# no torch is importable, then hyperrouter itself in editable mode with the extras named in $1.
#   bash scripts/setup.sh            # runtime only
#   bash scripts/setup.sh dev        # + pytest, ruff, matplotlib
#   bash scripts/setup.sh dev,bench  # + transformers (benchmark peers)
#   bash scripts/setup.sh hf         # + transformers, tokenizers (integrations, modern decoder)
#   bash scripts/setup.sh serve      # + FastAPI, uvicorn (hyperrouter serve)
# When no torch is importable it installs ${TORCH_SPEC:-torch==2.13.0}; users with their own torch
# keep it. Which build that is depends on where pip looks: on Linux x86-64, PyPI's torch==2.13.0 is
# the CUDA build (with several GB of nvidia-* wheels); PyTorch's CPU index gives the CPU build:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# (the index is used for torch only). A pip configured with a local wheel folder (find-links) or
# another index takes the wheel it finds there; macOS and Windows wheels on PyPI are CPU builds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  py="$VIRTUAL_ENV/bin/python"
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ -n "$extras" ]; then target=".[${extras}]"; else target="."; fi
"$py" -m pip install -q -e "$target"
