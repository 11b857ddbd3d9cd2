"""Process-wide test settings: DeepSpeed on CPU, its JIT-built ops cached beside the venv (built once per
machine, not once per test), and no test ever talks to a tracking server it did not start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
