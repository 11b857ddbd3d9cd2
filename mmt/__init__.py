"""mmt: distributed training of multimodal (text, image, audio) transformers."""

from __future__ import annotations

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
    from mmt.model.factory import create_model
    from mmt.model.multimodal import MultiModalModel, MultiModalOutput


_INFERENCE = (
    "InputError",
    "Waveform",
    "create_model_and_transforms",
    "get_tokenizer",
    "load_audio",
    "load_image",
    "topk_accuracy",
    "zero_shot_accuracy",
    "zero_shot_classifier",
)


def __getattr__(name: str) -> Any:
    # Lazy: `import mmt` stays cheap for the CLI; torch is imported when the model is first asked for.
    if name == "create_model":
        from mmt.model.factory import create_model

        return create_model
    if name in _INFERENCE:
        from mmt import inference

        return getattr(inference, name)
    if name in ("list_models", "list_runs"):
        from mmt.config import named

        return getattr(named, name)
    if name in ("MultiModalModel", "MultiModalOutput"):
        from mmt.model import multimodal

        return getattr(multimodal, name)
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
