"""The training tasks mmt knows: the one registry `train.task` is checked against, and what each task asks of the
data and of the config.

Each `TaskSpec` holds a task's batch contract (read by the data pipeline instead of comparing task names), what
the shard builder requires of an input record for it (``mmt shards build --task``), and the typed settings of its
``train.tasks.<name>`` section. The loss, the metrics and the evaluation of each task are its class in
`mmt.training.tasks`, registered under the same name. Adding a task: one `TaskSpec` (and its settings class) here,
one `Task` class there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmt.config.fields import cfg_field


@dataclass
class RetrievalConfig:
    """``train.tasks.retrieval``: the contrastive loss and the zero-shot evaluation."""

    text_audio_weight: float = cfg_field(
        1.0, doc="weight of the text-audio pair loss (text-image is 1)", ge=0
    )
    zero_shot_classes: list[str] = cfg_field(
        default_factory=list,
        doc="eval: class names for zero-shot accuracy of the samples' json 'label' (index) ([]: off)",
    )
    zero_shot_templates: list[str] = cfg_field(
        default_factory=lambda: ["{c}"],
        doc="eval: prompt templates ({c}: class name, {i}: its index), embeddings averaged per class",
    )


@dataclass
class VQAConfig:
    """``train.tasks.vqa``: no settings of its own yet (the answer vocabulary is ``data.answer_vocab``, its size
    ``model.heads.vqa_answers``)."""


@dataclass
class CaptioningConfig:
    """``train.tasks.captioning``: the token loss and the decoding at evaluation."""

    label_smoothing: float = cfg_field(0.1, doc="label smoothing of the token cross-entropy", ge=0, le=0.99)
    max_tokens: int = cfg_field(24, doc="eval: greedy decode length in tokens", ge=1)


@dataclass(frozen=True)
class TaskSpec:
    """One task's batch contract, shard requirements and settings class."""

    name: str
    text: str  # what fills text_inputs: "captions" (json captions / caption / .txt) or "question" (json question)
    config: type  # the dataclass of train.tasks.<name>
    answer_targets: bool = (
        False  # the batch carries VQA soft scores over the answer vocabulary (answer_targets)
    )
    text_len_from_decoder: bool = (
        False  # text is the decoder's input and target: capped at model.decoder.max_len
    )
    shard_needs: tuple[str, ...] = (
        "image",
        "caption",
    )  # what `mmt shards build --task NAME` requires of a record
    shard_media: tuple[str, ...] = ("image",)  # the media `mmt shards build --task NAME` keeps


TASK_SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("retrieval", text="captions", config=RetrievalConfig, shard_media=("image", "audio")),
        TaskSpec(
            "vqa",
            text="question",
            config=VQAConfig,
            answer_targets=True,
            shard_needs=("image", "question", "answers"),
        ),
        TaskSpec("captioning", text="captions", config=CaptioningConfig, text_len_from_decoder=True),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_SPECS)

# `train.tasks`: one section per registered task, built from the registry so a new task needs no edit elsewhere.
TasksConfig = dataclasses.make_dataclass(
    "TasksConfig",
    [(s.name, s.config, field(default_factory=s.config)) for s in TASK_SPECS.values()],
)
TasksConfig.__module__ = __name__
TasksConfig.__doc__ = (
    "``train.tasks.<name>``: the settings of each task (only the one `train.task` names is used)."
)

# Keys that moved into a task's section: a config still using one is refused with the new key.
MOVED_KEYS: dict[str, str] = {
    "train.label_smoothing": "train.tasks.captioning.label_smoothing",
    "train.caption_max_tokens": "train.tasks.captioning.max_tokens",
    "train.text_audio_weight": "train.tasks.retrieval.text_audio_weight",
    "train.zero_shot_classes": "train.tasks.retrieval.zero_shot_classes",
    "train.zero_shot_templates": "train.tasks.retrieval.zero_shot_templates",
}


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name``; ValueError listing the known tasks otherwise."""
    if name not in TASK_SPECS:
        raise ValueError(f"task {name!r} is not one of {TASK_NAMES}")
    return TASK_SPECS[name]


def task_settings(tasks: object, name: str) -> object:
    """The ``train.tasks.<name>`` section of a `TasksConfig`."""
    return getattr(tasks, task_spec(name).name)
