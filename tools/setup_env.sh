#!/usr/bin/env bash
# Build .venv with every pinned dependency. Idempotent: re-running with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.sinkgd-setup-stamp
want=$(cat constraints.txt setup.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)

# 1. system packages: Open MPI (mpirun + headers for mpi4py), numactl (deepspeed --bind_cores_to_rank)
need_apt=()
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] \
  || dpkg -s libopenmpi-dev >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
command -v numactl >/dev/null || need_apt+=(numactl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "[setup] missing system packages: ${need_apt[*]} (run as root or install them with apt)" >&2
    exit 1
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# 2. venv; torch FIRST and pinned, so nothing later can pull a CUDA build
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q torch==2.13.0

# 3. DeepSpeed with the CPU shm comm op compiled in (otherwise every fresh env JIT-builds it, ~50 s)
if ! $VENV/bin/python - <<'PYEOF' 2>/dev/null
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("deepspeed")
assert spec is not None
root = pathlib.Path(spec.origin).parent
info = (root / "git_version_info_installed.py").read_text()
assert "'deepspeed_shm_comm': True" in info or "'deepspeed_shm_comm': 1" in info
import deepspeed.version as v; assert v.__version__.startswith("0.19.8")
PYEOF
then
  echo "[setup] building deepspeed 0.19.8 with the CPU shm comm op (~2 min, once)"
  $PIP install -q deepspeed==0.19.8 -c constraints.txt
  DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu $PIP install -q --no-build-isolation --no-cache-dir \
    --force-reinstall --no-deps deepspeed==0.19.8
fi

# 4. the package itself with every extra, pinned
$PIP install -q -c constraints.txt -e ".[all]"

# 4b. the native CPU Sinkhorn kernels (g++ + OpenMP, ~3 s, cached in ~/.cache/sinkgd_ds/kernels);
# without a compiler the torch path is used, so this is not fatal
$VENV/bin/python -m sinkgd_ds.kernels || echo "[setup] native kernels not built; SinkGD uses its torch path"

# 5. checks: CPU torch only, no CUDA wheels (triton is fine: a self-contained wheel with no dependencies,
# whose interpreter runs the Triton backend's tests on CPU tensors)
if $PIP list 2>/dev/null | grep -i -E '^nvidia-' >/dev/null; then
  echo "[setup] CUDA packages were pulled into $VENV; refusing (torch must stay the CPU build)" >&2
  exit 1
fi
echo "$want" > "$STAMP"
echo "[setup] $VENV ready: $($VENV/bin/python -c 'import torch,deepspeed;print("torch",torch.__version__,"deepspeed",deepspeed.__version__)' 2>/dev/null)"
