# Sourced by the launch scripts: repository root, the venv's binaries, DeepSpeed's op cache, CPU fallback.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.venv/bin"
[ -x "$bin/python" ] || bin="$(dirname "$(command -v python3)")"
# DeepSpeed JIT-builds its ops once per machine; keep them beside the venv (launch/env.sh does the same).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.venv/torch_extensions}"
# No GPU: DeepSpeed's CPU accelerator (gloo), without its "no accelerator found" warning.
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
usage_exit() { echo "usage: $1" >&2; exit 2; }
