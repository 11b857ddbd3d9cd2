#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install mmt into it (editable) with its test extras.
# MMT_TORCH_SPEC overrides the torch requirement (default: the CPU wheel torch==2.13.0),
# e.g. MMT_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" on a GPU cluster.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
torch_spec="${MMT_TORCH_SPEC:-torch==2.13.0}"
stamp=".venv/.mmt-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) ${torch_spec}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q $torch_spec
    # Keep the torch that was just installed: a constraint stops any dependency from swapping it for a CUDA build.
    torch_version="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
    constraints="$(mktemp)"
    echo "torch==${torch_version}" > "$constraints"
    .venv/bin/python -m pip install -q -c "$constraints" -e ".[test]"
    rm -f "$constraints"
    .venv/bin/python -m pip check
    echo "$want" > "$stamp"
fi
# DeepSpeed JIT-builds its CPU ops once per machine; keep them beside the venv so every run reuses them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.venv/torch_extensions}"
