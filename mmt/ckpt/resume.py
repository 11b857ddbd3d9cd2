"""Resume safely: decide how a checkpoint can be loaded by a run of a given world size and ZeRO stage, or refuse.

DeepSpeed alone is not safe here: a full load on another world size raises, but ``load_module_only=True`` on a
ZeRO-3 checkpoint from another world size loads wrong weights without an error. The trainer calls
`check_resumable` *before* ``deepspeed.initialize`` (the plan decides ``"checkpoint": {"load_universal": ...}``),
then `load_for_resume` after it:

    plan = check_resumable(ckpt_dir, world_size=W, zero_stage=cfg.train.zero_stage, config=to_dict(cfg))
    ds_config.update(plan.ds_config_patch())
    engine, ... = deepspeed.initialize(...)
    client = load_for_resume(engine, plan)        # verified: right tag, step counter continued
    rng = rank_rng_state(client, rank)            # None for a rank the saved run did not have

Same world size and stage: DeepSpeed's own files load directly. ZeRO-0: the files hold everything unpartitioned,
any world size loads them. A universal checkpoint (`mmt ckpt to-universal`) loads on any world size. Anything
else raises `CheckpointError` naming the checkpoint file and the command that converts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmt.ckpt.client_state import ClientState, raw_record
from mmt.ckpt.layout import META_FILE, CheckpointError, read_meta, resolve_tag_dir
from mmt.ckpt.modelcheck import diff_dicts
from mmt.ckpt.reader import ZeroCheckpoint
from mmt.ckpt.torchio import check_files, load_pt
from mmt.ds_compat import fix_zero3_universal_load


@dataclass
class ResumePlan:
    load_dir: Path  # the checkpoint root: pass to engine.load_checkpoint(load_dir, tag=tag)
    tag: str
    step: int
    load_universal: bool  # must be set in the DeepSpeed config before deepspeed.initialize
    saved_world_size: int
    world_size: int
    saved_zero_stage: int
    zero_stage: int
    meta: dict[str, Any] = field(default_factory=dict)
    converted_from: Path | None = None  # the DeepSpeed checkpoint this universal one was made from, on resume
    convert_seconds: float = 0.0

    def ds_config_patch(self) -> dict[str, Any]:
        return {"checkpoint": {"load_universal": self.load_universal}}

    def describe(self) -> str:
        how = (
            "universal checkpoint (re-partitioned on load)"
            if self.load_universal
            else "DeepSpeed's files as saved"
        )
        where = self.load_dir / self.tag
        if self.converted_from is not None:
            where = self.converted_from
            how = (
                f"a universal checkpoint rank 0 converted it to in {self.convert_seconds:.1f} s "
                "(re-partitioned on load, then deleted)"
            )

        def ranks(n: int) -> str:
            return f"{n} rank{'' if n == 1 else 's'}"

        return (
            f"resume {where} at step {self.step}: saved on {ranks(self.saved_world_size)} "
            f"(ZeRO-{self.saved_zero_stage}), loading on {ranks(self.world_size)} (ZeRO-{self.zero_stage}) "
            f"from {how}"
        )


def _convert_hint(tag_dir: Path) -> str:
    run = tag_dir.parent.parent if tag_dir.parent.name == "checkpoints" else tag_dir.parent
    return f"convert it first: `mmt ckpt to-universal {run} NEW_RUN_DIR --tag {tag_dir.name}`, then resume from NEW_RUN_DIR"


def check_resumable(
    ckpt_dir: str | os.PathLike,
    world_size: int,
    zero_stage: int,
    *,
    tag: str | None = None,
    config: dict[str, Any] | None = None,
) -> ResumePlan:
    """How to resume from ``ckpt_dir`` (run dir, ``checkpoints/`` or a tag folder) on ``world_size`` ranks.

    ``config``: the new run's resolved config (``mmt.config.to_dict(cfg)``); its ``model`` section must equal the
    checkpoint's. Raises `CheckpointError` naming the checkpoint file for anything that would not load exactly.
    """
    tag_dir = resolve_tag_dir(ckpt_dir, tag, complete=True)
    root, tag = tag_dir.parent, tag_dir.name
    meta = read_meta(tag_dir)
    if config is not None and isinstance(meta.get("config"), dict) and "model" in meta["config"]:
        diffs = diff_dicts(meta["config"]["model"], config.get("model", {}))
        if diffs:
            shown = "; ".join(f"model.{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs[:6])
            raise CheckpointError(f"{tag_dir / META_FILE}: trained with a different model config: {shown}")
    # DeepSpeed unpickles these itself during engine.load_checkpoint: vet every one of them now, before it starts.
    check_files(sorted(tag_dir.rglob("*.pt")))
    step = int(meta.get("step", -1))
    universal = bool(meta.get("universal")) or (tag_dir / "zero").is_dir()

    def plan(load_universal: bool, saved_ws: int, saved_stage: int) -> ResumePlan:
        return ResumePlan(
            root, tag, step, load_universal, saved_ws, world_size, saved_stage, zero_stage, meta
        )

    if universal:
        saved_stage = int(meta.get("source_zero_stage", meta.get("zero_stage", -1)))
        saved_ws = int(meta.get("source_world_size", meta.get("world_size", -1)))
        if not (tag_dir / "zero" / "optimizer_state.pt").is_file():
            raise CheckpointError(
                f"{tag_dir / 'zero' / 'optimizer_state.pt'}: missing; the universal checkpoint is incomplete"
            )
        model_file = (
            "zero_pp_rank_0_mp_rank_00_model_states.pt" if saved_stage == 3 else "mp_rank_00_model_states.pt"
        )
        if not (tag_dir / model_file).is_file():
            raise CheckpointError(f"{tag_dir / model_file}: missing; the universal checkpoint is incomplete")
        if (saved_stage == 3) != (zero_stage == 3) or zero_stage == 0:
            raise CheckpointError(
                f"{tag_dir / model_file}: a universal checkpoint from ZeRO-{saved_stage} loads into ZeRO-1/2 or into "
                f"ZeRO-3 like its source ({'ZeRO-3' if saved_stage == 3 else 'ZeRO-1/2'}), not into ZeRO-{zero_stage}"
            )
        return plan(True, saved_ws, saved_stage)

    ck = ZeroCheckpoint(tag_dir)  # every rank file present and consistent, or a CheckpointError naming it
    if ck.stage != zero_stage:
        raise CheckpointError(
            f"{ck.optim_files[0] if ck.optim_files else ck.model_file}: saved with ZeRO-{ck.stage}, this run uses "
            f"ZeRO-{zero_stage}: resume with train.zero_stage={ck.stage}"
            + (f", or {_convert_hint(tag_dir)}" if ck.stage in (1, 2) and zero_stage in (1, 2) else "")
        )
    if ck.stage == 0 or ck.world_size == world_size:
        return plan(False, ck.world_size, ck.stage)
    raise CheckpointError(
        f"{ck.optim_files[0]}: saved by {ck.world_size} ranks with ZeRO-{ck.stage}, this run has {world_size}: "
        f"DeepSpeed cannot re-partition it on load (and loading only the module would give wrong weights under "
        f"ZeRO-3); {_convert_hint(tag_dir)}"
    )


def load_for_resume(engine: Any, plan: ResumePlan, **load_kwargs: Any) -> dict[str, Any]:
    """``engine.load_checkpoint`` for ``plan``, verified: DeepSpeed returns ``(None, None)`` instead of raising
    when it finds no files, and a wrong tag would restart the step counter; both become errors here."""
    if bool(engine._config.load_universal_checkpoint) != plan.load_universal:
        raise CheckpointError(
            f'{plan.load_dir / plan.tag}: the plan needs "checkpoint": {{"load_universal": {plan.load_universal}}} '
            "in the DeepSpeed config at deepspeed.initialize (use plan.ds_config_patch())"
        )
    load_path, client = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, **load_kwargs)
    if load_path is None or client is None:
        raise CheckpointError(f"{plan.load_dir / plan.tag}: DeepSpeed found no checkpoint files to load")
    if plan.load_universal and plan.zero_stage == 3:
        path = plan.load_dir / plan.tag / "zero" / "optimizer_state.pt"
        try:
            fix_zero3_universal_load(engine, load_pt(path, mmap=False))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    step = mmt_client_state(client).get("step", engine.global_steps)
    if int(step) != plan.step or int(engine.global_steps) != plan.step:
        raise CheckpointError(
            f"{plan.load_dir / plan.tag / META_FILE}: step {plan.step}, but the loaded state says step {step} "
            f"(engine global_steps {engine.global_steps})"
        )
    return client


def mmt_client_state(client_state: dict[str, Any]) -> dict[str, Any]:
    """mmt's part of DeepSpeed's client state as a plain dict (see `mmt.ckpt.client_state.ClientState`)."""
    return raw_record(client_state)


def rank_rng_state(client_state: dict[str, Any], rank: int) -> Any | None:
    """This rank's saved RNG state, or None when the saved run had fewer ranks (seed that rank afresh)."""
    return ClientState.from_client_state(client_state).rank_rng(rank)


def rank_loader_state(client_state: dict[str, Any], rank: int) -> Any | None:
    """The data-loader state for ``rank`` on the new world size (`ClientState.rank_loader`)."""
    return ClientState.from_client_state(client_state).rank_loader(rank)
