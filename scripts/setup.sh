#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv (or the active one), a CPU torch only when
# no torch is importable, then hyperrouter itself in editable mode with the extras named in $1.
#   bash scripts/setup.sh            # runtime only
#   bash scripts/setup.sh dev        # + pytest, ruff, matplotlib
#   bash scripts/setup.sh dev,bench  # + transformers (benchmark peers)
# TORCH_SPEC overrides the torch requirement installed when none is importable
# (default torch==2.13.0, a CPU build); users with their own torch keep it.
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
  "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ -n "$extras" ]; then target=".[${extras}]"; else target="."; fi
"$py" -m pip install -q -e "$target"
