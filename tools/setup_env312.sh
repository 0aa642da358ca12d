#!/usr/bin/env bash
# The Python 3.12 lane (.venv312): megatron-core 0.19.x, whose wheel ships Megatron-LM's own training loop
# (megatron/training), so the Megatron suite and Megatron-LM's real loop (tests/megatron_lm) run against it.
# megatron-core 0.17+ is cp312-only. torch for 3.12 comes from the registry as a CUDA build with its nvidia-*
# dependencies (several GB; it runs on the CPU): allowed in this lane only, the 3.11 lane stays CPU-only.
# pip's cache keeps the wheels for the next build. Idempotent: re-running with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV312:-.venv312}
STAMP=$VENV/.sinkgd-setup-stamp
want=$(cat constraints312.txt tools/setup_env312.sh setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then
  for candidate in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12" "$(command -v pyenv >/dev/null && \
      PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || true)"; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate
      break
    fi
  done
fi
if [ -z "$PY312" ]; then
  echo "[setup312] no Python 3.12 found (tried python3.12 and pyenv's 3.12.1); set PYTHON312=/path/to/python3.12" >&2
  exit 1
fi

[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
echo "[setup312] installing megatron-core 0.19.x and torch (a CUDA build from the registry, several GB, once)"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q -r constraints312.txt
$PIP install -q --no-deps -e .
$VENV/bin/python -c 'import megatron.core, megatron.training.training, torch; print("[setup312]", "megatron-core",
    megatron.core.__version__, "torch", torch.__version__)'
echo "$want" > "$STAMP"
