"""The training tasks mmt knows, and what each asks of the data: the one list `train.task` is checked against.

The data pipeline sits below the training code, so it reads this data contract instead of comparing task names;
the loss, the metrics and the evaluation of each task are its class in `mmt.training.tasks` (registered under the
same name). Adding a task: one `TaskSpec` here, one `Task` class there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One task's batch contract."""

    name: str
    text: str  # what fills text_inputs: "captions" (json captions / caption / .txt) or "question" (json question)
    answer_targets: bool = (
        False  # the batch carries VQA soft scores over the answer vocabulary (answer_targets)
    )
    text_len_from_decoder: bool = (
        False  # text is the decoder's input and target: capped at model.decoder.max_len
    )


TASK_SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("retrieval", text="captions"),
        TaskSpec("vqa", text="question", answer_targets=True),
        TaskSpec("captioning", text="captions", text_len_from_decoder=True),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASK_SPECS)


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name``; ValueError listing the known tasks otherwise."""
    if name not in TASK_SPECS:
        raise ValueError(f"task {name!r} is not one of {TASK_NAMES}")
    return TASK_SPECS[name]
