# Sourced by the run_*.sh wrappers: CPU defaults when there is no GPU, the repo's venv if present.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
BIN="${VENV:-.venv}/bin"
[ -x "$BIN/python" ] || BIN="$(dirname "$(command -v python3)")"
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29517}"
