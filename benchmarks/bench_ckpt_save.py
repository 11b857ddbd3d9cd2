"""How long a training step blocks to save a checkpoint: mmt's save against a plain ``torch.save``, side by side.

For each ZeRO stage asked for, one process (gloo, world size 1) builds the model (base_tri unless --model) under
mmt's DeepSpeed engine and, beside it, the same model under a plain torch AdamW; both take one real step (so the
optimizer moments exist), then the saves take turns, round by round:

* ``mmt save``: what the step blocks on (`CheckpointManager.save`: barriers, DeepSpeed's ``save_checkpoint`` of
  the ZeRO files, then ``mmt_meta.json`` (the completion marker) and ``latest``, written last and atomically);
* ``DeepSpeed save_checkpoint``: the engine's save alone, to show what mmt adds around it;
* ``plain torch.save``: one file ``{"model": state_dict, "optimizer": state_dict}`` of the plain model, and
  ``plain torch.save + fsync`` (what flushing that much data to the device costs on this file system).

Each save goes to a fresh folder on the same file system (``--dir``, default a temporary folder), after an
``os.sync()``; the folders are deleted after the stage's last round. The order of the saves rotates from round to
round, so with as many rounds as saves each takes every place once. The median round is reported with the bytes
written.

    .venv/bin/python benchmarks/bench_ckpt_save.py                       # base_tri, ZeRO-2 and ZeRO-3
    .venv/bin/python benchmarks/bench_ckpt_save.py --stages 2 --rounds 5 --model configs/model/tiny_tri.yaml
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(save: Callable[[Path], None], out: Path) -> tuple[float, int]:
    """(seconds ``save`` blocked, bytes it wrote) for a save into the fresh folder ``out``.

    Nothing is deleted until a stage's rounds are done: on a file system mounted with ``discard`` (this one), the
    deletion of a flushed checkpoint trims its blocks after the next journal commit and slowed whichever save came
    next by up to 1.5 s."""
    out.mkdir(parents=True)
    os.sync()  # every variant starts from a clean page cache
    t0 = time.perf_counter()
    save(out)
    sec = time.perf_counter() - t0
    return sec, _folder_bytes(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/base_tri.yaml"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument(
        "--rounds", type=int, default=4, help="rounds (the 4 saves rotate: 4 = each in every place)"
    )
    p.add_argument(
        "--dir", default="", help="where the checkpoints are written (default: a temporary folder)"
    )
    args = p.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    sys.path.insert(0, str(ROOT))
    import torch

    import mmt
    from benchmarks.bench_train import _batch
    from mmt.ckpt.manager import CheckpointManager
    from mmt.training.batching import resolve_batch
    from mmt.training.distributed import setup_distributed, teardown_distributed
    from mmt.training.engine import build_ds_config, initialize_for_training
    from mmt.training.optim import param_groups
    from mmt.training.rng import capture_rng
    from mmt.training.tasks import build_task

    with tempfile.TemporaryDirectory() as tmp:
        batch, cfg = _batch(Path(tmp), args.model, args.batch)
    _, _, created = setup_distributed("cpu", "gloo", 600)
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.grad_accum = args.batch, 0, 0
    task = build_task(cfg.model, cfg.train)
    dev, f32 = torch.device("cpu"), torch.float32
    opt = cfg.train.optimizer
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_save_"))

    torch.manual_seed(0)
    plain = mmt.create_model(cfg.model)
    adamw = torch.optim.AdamW(param_groups(plain, opt.weight_decay), lr=opt.lr, fused=True)
    task.step(plain, batch, dev, f32).loss.backward()
    adamw.step()
    n_params = plain.num_parameters()

    def plain_save(out: Path, flush: bool = False) -> None:
        torch.save({"model": plain.state_dict(), "optimizer": adamw.state_dict()}, out / "checkpoint.pt")
        if flush:
            _fsync(out / "checkpoint.pt")
            _fsync(out)

    print(
        f"model {Path(args.model).name}: {n_params / 1e6:.1f}M params, fp32, 1 rank (gloo) | "
        f"{args.rounds} rounds, median | checkpoints in {work}"
    )
    print(f"{'ZeRO':<6}{'save':<28}{'seconds':>9}{'GB written':>12}{'vs torch.save':>15}")
    try:
        for stage in args.stages:
            cfg.train.zero_stage = stage
            ds = build_ds_config(cfg.train, resolve_batch(cfg.train, 1), dev)
            torch.manual_seed(0)
            model = mmt.create_model(cfg.model)
            engine = initialize_for_training(model, cfg.train, ds)
            engine.backward(task.step(engine, batch, dev, f32).loss)
            engine.step()
            manager_root = work / f"zero{stage}_run"
            client = {"mmt": {"step": 1, "samples_seen": args.batch, "rng_states": [capture_rng()]}}
            meta = {"step": 1, "zero_stage": stage, "world_size": 1, "config": {}}

            def mmt_save(out: Path, engine=engine, client=client, meta=meta) -> None:
                CheckpointManager(out, keep_last=0, rank=0).save(engine, 1, client, meta)

            def ds_save(out: Path, engine=engine, client=client) -> None:
                engine.save_checkpoint(str(out), tag="step_00000001", client_state=client, save_latest=False)

            saves = {
                "mmt save": mmt_save,
                "DeepSpeed save_checkpoint": ds_save,
                "plain torch.save": plain_save,
                "plain torch.save + fsync": functools.partial(plain_save, flush=True),
            }
            results: dict[str, list[tuple[float, int]]] = {k: [] for k in saves}
            names = list(saves)
            for r in range(args.rounds):
                for i, name in enumerate(names[r % len(names) :] + names[: r % len(names)]):
                    results[name].append(_timed(saves[name], manager_root / f"{r}_{i}"))
            secs = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
            for name, sec in secs.items():
                gb = results[name][0][1] / 1e9
                print(f"{stage:<6}{name:<28}{sec:>9.2f}{gb:>12.2f}{sec / secs['plain torch.save']:>14.2f}x")
            del engine, model
            shutil.rmtree(manager_root)
    finally:
        teardown_distributed(created)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
