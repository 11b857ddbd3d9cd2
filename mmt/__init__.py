"""mmt: distributed training of multimodal (text, image, audio) transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mmt.config.named import list_models, list_runs
    from mmt.inference import (
        InputError,
        Waveform,
        create_model_and_transforms,
        get_tokenizer,
        load_audio,
        load_image,
        topk_accuracy,
        zero_shot_accuracy,
        zero_shot_classifier,
    )
    from mmt.inference.factory import create_model
    from mmt.model.multimodal import MultiModalModel, MultiModalOutput


# public name -> the module that defines it, imported on first use (PEP 562) so that `import mmt` (and with it
# every `mmt` command, `mmt --help` included) stays free of torch
_LAZY = {
    "create_model": "mmt.inference.factory",
    "create_model_and_transforms": "mmt.inference.factory",
    "get_tokenizer": "mmt.inference.factory",
    "InputError": "mmt.inference.media",
    "Waveform": "mmt.inference.media",
    "load_audio": "mmt.inference.media",
    "load_image": "mmt.inference.media",
    "topk_accuracy": "mmt.inference.zero_shot",
    "zero_shot_accuracy": "mmt.inference.zero_shot",
    "zero_shot_classifier": "mmt.inference.zero_shot",
    "list_models": "mmt.config.named",
    "list_runs": "mmt.config.named",
    "MultiModalModel": "mmt.model.multimodal",
    "MultiModalOutput": "mmt.model.multimodal",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmt' has no attribute {name!r}")


__all__ = [
    "InputError",
    "MultiModalModel",
    "MultiModalOutput",
    "Waveform",
    "__version__",
    "create_model",
    "create_model_and_transforms",
    "get_tokenizer",
    "list_models",
    "list_runs",
    "load_audio",
    "load_image",
    "topk_accuracy",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
