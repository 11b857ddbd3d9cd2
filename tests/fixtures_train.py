"""Shared pieces of the training tests: tiny real shards, run configs, launchers, and 2-rank check scenarios.

The scenarios at the bottom run inside ``torchrun --nproc_per_node 2 -m tests.fixtures_train SCENARIO ...``:
several checks share one launch (process start-up and DeepSpeed import dominate a tiny run's cost on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_TRI = ROOT / "configs/model/tiny_tri.yaml"
PY = sys.executable
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------- data
def write_shards(
    out: Path, n: int, per_shard: int = 16, seed: int = 0, no_audio: Callable[[int], bool] | None = None
) -> str:
    """``n`` synthetic tri-modal samples (real shard writer); ``no_audio(i)`` drops sample i's audio."""
    from mmt.data.build.builder import write_samples
    from mmt.data.build.process import Processed
    from mmt.data.synthetic import COLOURS, synthetic_sample

    def gen():
        for i in range(n):
            s = synthetic_sample(i, seed)
            mods = ("image", "text", "audio", "vqa")
            if no_audio is not None and no_audio(i):
                s.pop("wav")
                mods = ("image", "text", "vqa")
            yield Processed(s["__key__"], f"synthetic[{i}]", s, None, mods)

    manifest = write_samples(gen(), str(out), max_samples_per_shard=per_shard, vocab=list(COLOURS))
    return manifest["urls"]


def write_config(
    path: Path,
    *,
    train_urls: str,
    val_urls: str = "",
    run_dir: Path,
    task: str = "retrieval",
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    tracking: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """A run config over the tiny tri-modal model with test-sized defaults (global batch 8, 3 steps)."""
    cfg = {
        "model": {**yaml.safe_load(TINY_TRI.read_text()), **(model or {})},
        "data": {
            "train_urls": train_urls,
            "val_urls": val_urls,
            "num_workers": 0,
            "cache_dir": str(path.parent / "cache"),
            **(data or {}),
        },
        "train": {
            "task": task,
            "run_dir": str(run_dir),
            "global_batch": 8,
            "max_steps": 3,
            "log_interval": 1,
            "progress_bar": False,
            "checkpoint_at_end": False,
            "eval_at_end": bool(val_urls),
            "torch_threads": 1,
            "zero_stage": 2,
            "schedule": {"warmup_steps": 1},
            **(train or {}),
        },
        "tracking": {
            "experiment": "mmt-tests",
            "run_name": run_dir.name,
            "backend": "none",
            **(tracking or {}),
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl rows with train/loss, by step (a later row for the same step wins: resumed runs)."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            rows[r["step"]] = r
    return rows


def eval_row(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith("val/") for k in r)][-1]


def consumed_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """Step -> keys this rank trained on (``train.record_keys``); a later line for a step wins."""
    out: dict[int, list[str]] = {}
    for line in (run_dir / "keys" / f"rank_{rank:05d}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["keys"]
    return out


def key_records(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    """Every (step, keys) line this rank wrote, in order: a replayed or skipped step shows here."""
    path = run_dir / "keys" / f"rank_{rank:05d}.jsonl"
    return [(r["step"], r["keys"]) for r in map(json.loads, path.read_text().splitlines())]


def global_keys(run_dir: Path, world_size: int) -> dict[int, list[str]]:
    """Step -> the global batch's keys (the ranks' slices in rank order), from every rank's record."""
    per_rank = [consumed_keys(run_dir, r) for r in range(world_size)]
    assert all(sorted(p) == sorted(per_rank[0]) for p in per_rank), "ranks recorded different steps"
    return {s: [k for p in per_rank for k in p[s]] for s in sorted(per_rank[0])}


def all_train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics.jsonl row with train/loss, in the order written (resumed runs append)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def final_weights(run_dir: Path, tag: str = "") -> dict[str, Any]:
    """The fp32 weights of a run's newest checkpoint (or ``tag``), read with DeepSpeed's own tools (not mmt's)."""
    import torch

    root = run_dir / "checkpoints"
    tag = tag or (root / "latest").read_text().strip()
    meta = json.loads((root / tag / "mmt_meta.json").read_text())
    if meta["zero_stage"] == 0:
        state = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


# ---------------------------------------------------------------------------------------------------- processes
def env_for_runs(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def mmt_single(*args: str) -> list[str]:
    return [PY, "-m", "mmt.train", *args]


def mmt_torchrun(nproc: int, *args: str) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "-m",
        "mmt.train",
        *args,
    ]


def mmt_deepspeed(nproc: int, *args: str) -> list[str]:
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "--module",
        "mmt.train",
        *args,
    ]


def scenario_torchrun(nproc: int, *args: str) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "-m",
        "tests.fixtures_train",
        *args,
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a failure can kill every child), output to a pipe."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env_for_runs(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def worker_pids(proc: subprocess.Popen, marker: str = "mmt.train") -> dict[int, int]:
    """Launcher children running ``marker``, by rank (from their RANK variable)."""
    import psutil

    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()) and "RANK" in child.environ():
                out[int(child.environ()["RANK"])] = child.pid
        except psutil.Error:
            continue
    return out


def run(
    cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion (own process group: a timeout kills every child); output captured."""
    proc = start(cmd, cwd, **env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{_tail(out)}") from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{_tail(out)}")
    return res


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(text: str | None, n: int = 60) -> str:
    lines = [x for x in (text or "").splitlines() if not x.startswith("[20")]  # drop DeepSpeed's info lines
    return "\n".join(lines[-n:])


def wait_for(
    pred: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}\n{_tail(out)}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------------- shared runs
RESUME_STEPS = 8
ZERO_STEPS = 6  # >= 5 real updates: step 1's lr is not zero (warmup starts at half the peak)
ZERO_SAVE = 3  # the ZeRO-2/3 parity runs also save here: the start of the resumes on 1 and 3 ranks
ZERO_BATCH = 6  # a global batch that 1, 2 and 3 ranks divide
ACCUM_STEPS = 3
EVAL_SAMPLES = 9
EVAL_RUNS = ("zero2", "vqa_accum", "cap")  # retrieval, VQA, captioning checkpoints evaluated on 1 and 2 ranks


@pytest.fixture(scope="session")
def dist_runs(tmp_path_factory) -> dict[str, Any]:
    """Every multi-process run of the training tests, launched once (start-up dominates at this size).

    * one torchrun launch (2 ranks) of several in-process runs: gathered contrastive loss, ZeRO 0-3 (the ZeRO-2/3
      runs save at step ``ZERO_SAVE`` too), ZeRO-3 with a rank that never sees audio, the uninterrupted reference
      of the resume check, and a run that crashes;
    * one process (torchrun, 1 rank): the single-process reference of the ZeRO parity checks, and the ZeRO-2/3
      runs resumed from step ``ZERO_SAVE`` on 1 rank (converted to universal checkpoints by the trainer);
    * the same resumes on 3 ranks;
    * the deepspeed launcher (2 ranks), preempted by SIGUSR1 on rank 1 only, then resumed under torchrun.
    """
    tmp = tmp_path_factory.mktemp("train_dist")
    urls = write_shards(tmp / "data", 32)  # 4 global batches of 8 per epoch
    urls64 = write_shards(tmp / "data64", 64)  # one global batch of 64 per step
    # 9 held-out samples: 2 ranks with eval batches of 4 get 5 and 4 (2 batches and 1: a rank runs out first)
    val = write_shards(tmp / "val", EVAL_SAMPLES, seed=1)
    # Unshuffled order: global batch b is samples 8b..8b+7 and rank 1 takes 8b+4..8b+7, which have no audio.
    mixed = write_shards(tmp / "mixed", 32, no_audio=lambda i: i % 8 >= 4)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    zero = {
        "max_steps": ZERO_STEPS,
        "seed": 3,
        "global_batch": ZERO_BATCH,
        "record_keys": True,
        "checkpoint_at_end": True,
        "keep_last": 0,
        "schedule": {"warmup_steps": 2, "warmup_init_ratio": 0.5},
    }
    cfgs = {
        "ref": write_config(
            tmp / "ref.yaml", train_urls=urls, run_dir=tmp / "ref", train={**zero, "zero_stage": 0}
        )
    }
    for st in (0, 1, 2, 3):
        cfgs[f"zero{st}"] = write_config(
            tmp / f"zero{st}.yaml",
            train_urls=urls,
            run_dir=tmp / f"zero{st}",
            val_urls=val if st == 2 else "",  # ZeRO-2 also evaluates (retrieval) on 2 ranks at the end
            train={
                **zero,
                "zero_stage": st,
                "checkpoint_interval": ZERO_SAVE if st in (2, 3) else 0,
                "offload_optimizer": st == 1,  # ZeRO-Offload through the trainer, held to the same parity
                "eval_batch": 4,
            },
        )
    # Gradient accumulation: 4 micro batches of 8 per rank equal 1 of 32 (VQA's loss is a per-sample mean);
    # the accumulating run also recomputes activations (activation checkpointing) and evaluates on 2 ranks.
    vqa = dict(
        task="vqa",
        train_urls=urls64,
        model={"heads": {"contrastive": True, "embed_dim": 64, "vqa_answers": 8}},
    )
    acc = {**zero, "max_steps": ACCUM_STEPS, "global_batch": 64, "record_keys": False}
    cfgs["vqa_accum"] = write_config(
        tmp / "vqa_accum.yaml",
        run_dir=tmp / "vqa_accum",
        val_urls=val,
        train={**acc, "micro_batch": 8, "grad_accum": 4, "activation_checkpointing": True, "eval_batch": 4},
        **vqa,
    )
    cfgs["vqa_whole"] = write_config(
        tmp / "vqa_whole.yaml", run_dir=tmp / "vqa_whole", train={**acc, "micro_batch": 32}, **vqa
    )
    cfgs["cap"] = write_config(
        tmp / "cap.yaml",
        task="captioning",
        train_urls=urls,
        val_urls=val,
        run_dir=tmp / "cap",
        model={"decoder": {"depth": 1, "max_len": 48}},
        train={
            "max_steps": 2,
            "tasks": {"captioning": {"max_tokens": 6}},
            "eval_batch": 4,
            "checkpoint_at_end": True,
        },
    )
    for st in (2, 3):
        for ws in (1, 3):
            cfgs[f"zero{st}_ws{ws}"] = write_config(
                tmp / f"zero{st}_ws{ws}.yaml",
                train_urls=urls,
                run_dir=tmp / f"zero{st}_ws{ws}",
                train={
                    **zero,
                    "zero_stage": st,
                    "resume": str(tmp / f"zero{st}/checkpoints/step_{ZERO_SAVE:08d}"),
                },
            )
    cfgs["mixed"] = write_config(
        tmp / "mixed.yaml",
        train_urls=mixed,
        run_dir=tmp / "mixed",
        data={"shuffle": False},
        # bf16 through the trainer (ZeRO-3); this check needs no fp32 parity
        train={
            **zero,
            "zero_stage": 3,
            "global_batch": 8,
            "max_steps": 4,
            "checkpoint_at_end": False,
            "precision": "bf16",
        },
    )
    resume = dict(
        train_urls=urls,
        model={"dropout": 0.1},  # dropout makes the per-rank RNG state part of what a resume must restore
        tracking={"backend": "mlflow", "uri": uri, "flush_interval_s": 0.5},
        train={
            "max_steps": RESUME_STEPS,
            "checkpoint_interval": 2,
            "keep_last": 2,
            "record_keys": True,
            "checkpoint_at_end": True,
            "resume": "auto",
        },
    )
    cfgs["resume_ref"] = write_config(tmp / "resume_ref.yaml", run_dir=tmp / "resume_ref", **resume)
    cfgs["pre"] = write_config(tmp / "pre.yaml", run_dir=tmp / "pre", **resume)
    # Evaluation at step 1 reads held-out shards that do not exist: the run dies mid-training.
    cfgs["crash"] = write_config(
        tmp / "crash.yaml",
        train_urls=urls,
        val_urls=str(tmp / "missing/shard-000000.tar"),
        run_dir=tmp / "crash",
        train={"eval_interval": 1, "max_steps": 3},
        tracking={"backend": "mlflow", "uri": uri},
    )

    evals = [f"@{cfgs[k]}" for k in EVAL_RUNS]  # `mmt eval` of the run's final checkpoint on this world size
    order = [
        *(str(cfgs[k]) for k in ("zero0", "zero1", "zero2", "zero3", "mixed", "resume_ref")),
        *(str(cfgs[k]) for k in ("vqa_accum", "vqa_whole", "cap")),
        f"!{cfgs['crash']}",
        *evals,
    ]
    run(scenario_torchrun(2, "contrastive+train", str(tmp), *order), cwd=tmp, timeout=480)
    for ws, specs in (
        (1, [str(cfgs[k]) for k in ("ref", "zero2_ws1", "zero3_ws1")] + evals),
        (3, [str(cfgs[k]) for k in ("zero2_ws3", "zero3_ws3")]),
    ):
        (tmp / f"ws{ws}").mkdir()
        out = run(scenario_torchrun(ws, "train", str(tmp / f"ws{ws}"), *specs), cwd=tmp, timeout=300)
        (tmp / f"ws{ws}/output.txt").write_text(out.stdout)

    proc = start(mmt_deepspeed(2, str(cfgs["pre"])), cwd=tmp)
    try:
        wait_for(
            lambda: (tmp / "pre/checkpoints/step_00000002/mmt_meta.json").exists(),
            240,
            "the first checkpoint",
            proc,
        )
        pids = worker_pids(proc)
        assert sorted(pids) == [0, 1], pids
        os.kill(
            pids[1], signal.SIGUSR1
        )  # one rank only: the flag must reach the other through the all-reduce
        out, _ = proc.communicate(timeout=240)
    except BaseException:
        kill_group(proc)
        raise
    from mmt.training.preemption import exited_due_to_preemption, preemption_info

    latest = (tmp / "pre/checkpoints/latest").read_text().strip()
    preempted = {
        "exit_code": proc.returncode,
        "output": out,
        "info": preemption_info(tmp / "pre"),
        "flag": exited_due_to_preemption(None, tmp / "pre"),
        "rows": train_rows(tmp / "pre"),
        "latest": latest,
        "meta": json.loads((tmp / "pre/checkpoints" / latest / "mmt_meta.json").read_text()),
    }
    run(mmt_torchrun(2, str(cfgs["pre"])), cwd=tmp, timeout=300)
    return {
        "tmp": tmp,
        "uri": uri,
        "preempted": preempted,
        "results": json.loads((tmp / "train_results.json").read_text()),
        "configs": cfgs,
    }


# ---------------------------------------------------------------------------------------------------- scenarios
def _scenario_contrastive(out: Path) -> None:
    """2 ranks: gathered CLIP loss == single-process loss over the concatenated batch; gradients too."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from mmt.training.losses import clip_pair_loss, contrastive_loss, global_loss_scale, scale_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    n, d, e = 8, 6, 5
    x = {m: torch.randn(n, d, generator=g) for m in ("text", "image", "audio")}
    audio_present = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)  # rank 1's rows: no audio at all
    pairs = [("text", "image", 1.0), ("text", "audio", 0.5)]

    def model():
        torch.manual_seed(1)
        proj = torch.nn.ModuleDict({m: torch.nn.Linear(d, e, bias=False) for m in x})
        scale = torch.nn.Parameter(torch.tensor(2.5))
        return proj, scale

    def forward(proj, scale, rows):
        emb = {m: F.normalize(proj[m](x[m][rows]), dim=-1) for m in x}
        present = {
            "text": torch.ones(len(rows), dtype=torch.bool),
            "image": torch.ones(len(rows), dtype=torch.bool),
            "audio": audio_present[rows],
        }
        return emb, present

    # single process over the whole batch
    proj, scale = model()
    emb, present = forward(proj, scale, torch.arange(n))
    for t in emb.values():
        t.retain_grad()
    # written out directly (no gathering): the loss the 2-rank computation must reproduce
    both = present["audio"]
    ref_loss = clip_pair_loss(emb["text"], emb["image"], scale.exp()) + 0.5 * clip_pair_loss(
        emb["text"][both], emb["audio"][both], scale.exp()
    )
    ref_loss.backward()
    ref_param_grads = [p.grad.clone() for p in [*proj.parameters(), scale]]
    ref_emb_grads = {m: t.grad.clone() for m, t in emb.items()}

    # this rank's half, features gathered across ranks
    rows = torch.arange(rank * n // world, (rank + 1) * n // world)
    proj, scale = model()
    emb, present = forward(proj, scale, rows)
    for t in emb.values():
        t.retain_grad()
    ls = scale_grad(scale.exp(), 1.0 / global_loss_scale())
    loss, _ = contrastive_loss(emb, present, ls, pairs)
    (loss * global_loss_scale()).backward()
    emb_grads_ok = all(
        torch.allclose(emb[m].grad / global_loss_scale(), ref_emb_grads[m][rows], atol=1e-6) for m in emb
    )
    grads = [p.grad.clone() for p in [*proj.parameters(), scale]]
    for gr in grads:  # what data parallelism does: average over ranks
        dist.all_reduce(gr)
        gr /= world
    result = {
        "loss": float(loss),
        "ref_loss": float(ref_loss),
        "local_feature_grads_match": bool(emb_grads_ok),
        "max_param_grad_diff": max(float((a - b).abs().max()) for a, b in zip(grads, ref_param_grads)),
        "max_param_grad": max(float(b.abs().max()) for b in ref_param_grads),
    }
    (out / f"contrastive_rank{rank}.json").write_text(json.dumps(result))


def _scenario_train(out: Path, configs: list[str]) -> None:
    """Run `mmt.training.trainer.train` for each config, one after another in this process group.

    A path prefixed with ``!`` is expected to fail (on every rank at the same point): its exception is recorded.
    A path prefixed with ``@`` evaluates the config's run's newest checkpoint instead (what `mmt eval` runs) into
    ``<run_dir>/eval_ws<world size>.json``.
    """
    import torch.distributed as dist

    from mmt.config import load_config
    from mmt.training.evaluation_run import evaluate_checkpoint
    from mmt.training.trainer import train

    results = {}
    for spec in configs:
        path = spec.lstrip("!@")
        cfg = load_config(path)
        t0 = time.perf_counter()
        if spec.startswith("@"):
            out_json = Path(cfg.train.run_dir) / f"eval_ws{dist.get_world_size()}.json"
            evaluate_checkpoint(cfg, cfg.train.run_dir, str(out_json), source=path)
            continue
        try:
            res = train(cfg, source=path)
        except Exception as e:  # noqa: BLE001 - only for configs marked as expected failures
            if not spec.startswith("!"):
                raise
            results[path] = {"exception": repr(e)}
            continue
        results[path] = {"exit_code": res.exit_code, "step": res.step, "seconds": time.perf_counter() - t0}
    if dist.get_rank() == 0:
        (out / "train_results.json").write_text(json.dumps(results))


def main(argv: list[str]) -> int:
    import deepspeed

    from mmt.training.distributed import setup_distributed, teardown_distributed

    scenario, out = argv[0], Path(argv[1])
    _, _, created = setup_distributed("cpu", "gloo", 120)
    del deepspeed
    try:
        if scenario == "contrastive":
            _scenario_contrastive(out)
        elif scenario == "train":
            _scenario_train(out, argv[2:])
        elif scenario == "contrastive+train":
            _scenario_contrastive(out)
            _scenario_train(out, argv[2:])
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    finally:
        teardown_distributed(created)
        # what the teardown left: gloo threads still running meet the interpreter's shutdown (abort at exit)
        threads = [(t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"exit_threads_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(threads))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
