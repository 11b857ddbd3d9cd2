"""The training loop: setup, then one loop that reads top to bottom, then a teardown that always runs.

`train(cfg)` is what `mmt train` calls on every rank. It works the same as a single process, under torchrun,
under the deepspeed launcher and under srun, on CPU (gloo) and CUDA (nccl): `mmt.training.distributed` maps each
launcher onto one set of rank variables. Data, model and tracker are built here; task losses, evaluation,
checkpoints and preemption each live in their own module.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmt.atomic import atomic_write_text
from mmt.ckpt.client_state import ClientState
from mmt.ckpt.layout import read_meta
from mmt.ckpt.manager import CheckpointManager, resume_point
from mmt.ckpt.torchio import checkpoint_loading
from mmt.config import Config, flatten, save_config, to_dict
from mmt.config.loader import dump_yaml, redacted_config
from mmt.config.preemption import PREEMPTED_EXIT_CODE, parse_signals
from mmt.precision import torch_dtype
from mmt.secrets import redact, secret_patterns
from mmt.tracking.logger import FAILED, FINISHED, KILLED, Logger, NullLogger
from mmt.training import distributed as D
from mmt.training.batching import BatchPlan, resolve_batch
from mmt.training.engine import initialize_for_training, resolve_ds_config
from mmt.training.evaluate import evaluate
from mmt.training.flops import mfu, peak_flops_per_device
from mmt.training.inputs import batch_size, count_tokens
from mmt.training.preemption import PreemptionFlag, clear_marker, write_marker
from mmt.training.rng import capture_rng, restore_rng, seed_everything
from mmt.training.tasks import Task, build_task
from mmt.training.telemetry import (
    NodeMeter,
    StepMeter,
    build_logger,
    grad_norm,
    memory_metrics,
    system_tags,
)

LoaderFactory = Callable[[Config, int, int, BatchPlan], Any]
EvalLoaderFactory = Callable[[Config, int, int, int], Iterable[dict[str, Any]]]


@dataclass
class TrainResult:
    exit_code: int
    step: int
    samples_seen: int
    run_dir: Path
    checkpoint: Path | None
    run_id: str | None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    preempted: bool = False


def split_micro(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Cut one rank's step batch into ``n`` micro batches (gradient accumulation), as equal as possible."""
    if n == 1:
        return [batch]
    b = batch_size(batch)
    if b < n:
        raise ValueError(f"a step batch of {b} samples cannot feed {n} micro batches")
    bounds = [round(i * b / n) for i in range(n + 1)]
    return [
        {k: (v[lo:hi] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def default_train_loader(cfg: Config, rank: int, world_size: int, plan: BatchPlan) -> Any:
    from mmt.data.loader import build_train_loader

    return build_train_loader(cfg, rank, world_size, plan.global_batch)


def default_eval_loader(cfg: Config, rank: int, world_size: int, batch: int) -> Iterable[dict[str, Any]]:
    from mmt.data.loader import build_eval_loader

    return build_eval_loader(cfg, rank, world_size, batch)


class Trainer:
    """Holds the state of one run; `run` executes it and always tears down what it set up."""

    def __init__(
        self,
        cfg: Config,
        source: str = "config",
        train_loader_factory: LoaderFactory | None = None,
        eval_loader_factory: EvalLoaderFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.train_loader_factory = train_loader_factory or default_train_loader
        self.eval_loader_factory = eval_loader_factory or default_eval_loader
        self.logger: Logger = NullLogger()
        self.step = 0
        self.samples_seen = 0
        # [step, world size, hostnames] each time the run (re)started on another world size: node losses and
        # regrowth under Slurm (slurm.min_nodes) show up here and in the tag mmt.world_sizes.
        self.world_sizes: list[list] = []

    # ------------------------------------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # DeepSpeed's ZeRO collectives call torch APIs that torch now flags on every step; not actionable here.
        warnings.filterwarnings(
            "ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        self.env, self.device, self._created_pg = D.setup_distributed(
            t.device, t.dist_backend, t.dist_timeout_s, t.rdzv_timeout_s
        )
        self.rank, self.world = self.env.rank, self.env.world_size
        self._node_meter = NodeMeter(self.env)
        import socket

        self._hostnames = D.gather_objects(socket.gethostname())
        self.plan = resolve_batch(t, self.world, self.source)
        self.dtype = torch_dtype(t.precision)
        self.run_dir = Path(t.run_dir).resolve()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()

        # DeepSpeed config: generated, then the user's JSON merged over it.
        resolved = resolve_ds_config(t, self.plan, self.device, self.source)
        ds, self.plan, self.ds_conflicts = resolved.config, resolved.plan, resolved.conflicts
        if self.ds_conflicts and self.rank == 0:
            print(
                "mmt: train.ds_config overrides the generated DeepSpeed config:\n  "
                + "\n  ".join(self.ds_conflicts),
                file=sys.stderr,
            )
        self.ds_config = ds

        # Resume point (rank 0 decides, every rank follows the same path).
        tag_dir = None
        if self.rank == 0:
            tag_dir = resume_point(t.resume, self.run_dir)
        tag_dir = D.broadcast_object(str(tag_dir) if tag_dir else None)
        self.resume_dir = Path(tag_dir) if tag_dir else None
        resume_meta = read_meta(self.resume_dir) if self.resume_dir else None
        self.resume_plan = None
        if self.resume_dir is not None:
            # Same world size: DeepSpeed's files load as saved; another world size: rank 0 converts them to a
            # universal checkpoint first; anything that would not load exactly is refused here, before any work.
            from mmt.training.resume import plan_resume

            with checkpoint_loading(t.trust_checkpoint):
                self.resume_plan = plan_resume(
                    self.resume_dir,
                    self.world,
                    self.rank,
                    ds["zero_optimization"]["stage"],
                    to_dict(cfg),
                    self.run_dir,
                )
            ds.setdefault("checkpoint", {}).update(self.resume_plan.ds_config_patch()["checkpoint"])

        # Model: identical initial weights on every rank, then per-rank random streams.
        import mmt

        torch.manual_seed(t.seed)
        model = mmt.create_model(cfg.model)
        if self.resume_dir is None and t.init_weights:
            from mmt.ckpt.pretrained import init_weights

            with checkpoint_loading(t.trust_checkpoint):
                init_weights(model, t.init_weights, t.init_weights_only)
        self.task: Task = build_task(cfg.model, t)
        if t.activation_checkpointing:
            from mmt.training.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        # Before DeepSpeed: ZeRO-3 partitions parameters, after which numel() no longer counts them.
        self.flops_per_sample = self.task.flops_per_sample(model.flops_per_sample())
        self.tokens_per_sample = model.tokens_per_sample()
        self.num_parameters = model.num_parameters()
        seed_everything(t.seed, self.rank)

        # Data.
        self.train_loader = self.train_loader_factory(cfg, self.rank, self.world, self.plan)
        self.total_steps = self._total_steps()

        # Tracker: rank 0 opens (or reopens) the MLflow run, the others only learn its id.
        run_id = resume_meta.get("mlflow_run_id") if resume_meta else None
        self.logger = build_logger(cfg, self.rank, run_id, self.total_steps, self.run_dir)
        self.run_id = D.broadcast_object(self.logger.run_id)

        self.engine = initialize_for_training(model, t, ds, self.total_steps)
        # ZeRO-0 fp32 does not keep the norm it clips with; measure it (grads are all-reduced by then).
        self._own_grad_norm = t.zero_stage == 0 and t.precision == "fp32"
        self._grad_norm: float | None = None
        self._step_lr = float("nan")
        self.ckpt = CheckpointManager(self.run_dir, t.keep_last, self.rank)

        if self.resume_plan is not None:
            self._restore(self.resume_plan)
        self._note_world_size()
        if self.rank == 0:
            clear_marker(self.run_dir)
            self._log_run_start()

    def _restore(self, plan: Any) -> None:
        from mmt.ckpt.resume import load_for_resume
        from mmt.training.resume import drop_converted

        with checkpoint_loading(self.cfg.train.trust_checkpoint):  # DeepSpeed unpickles the files itself
            client = load_for_resume(self.engine, plan)
        drop_converted(plan, self.rank)
        state = ClientState.from_client_state(client)
        self.step = int(state.step)
        self.samples_seen = int(state.samples_seen)
        self.world_sizes = [list(x) for x in state.world_sizes or [[0, plan.saved_world_size, ""]]]
        loader_state = state.rank_loader(self.rank)
        if loader_state is not None:
            self.train_loader.load_state_dict(loader_state)
        rng = state.rank_rng(self.rank)
        if rng is not None and plan.saved_world_size == self.world:
            restore_rng(rng)
        else:  # a rank the saved run did not have (or a different layout): a fresh, reproducible stream
            seed_everything(self.cfg.train.seed + 1_000_003 * self.step, self.rank)
        if self.rank == 0:
            print(
                f"mmt: resumed from {self.resume_dir} at step {self.step} ({self.samples_seen} samples): "
                f"{plan.describe()}",
                flush=True,
            )

    def _note_world_size(self) -> None:
        """Append this start to the world-size history when the world size differs from the last one."""
        hosts = ",".join(sorted(set(self._hostnames)))
        if self.world_sizes and self.world_sizes[-1][1] == self.world:
            return
        if self.world_sizes and self.rank == 0:
            print(
                f"mmt: world size changed from {self.world_sizes[-1][1]} to {self.world} ranks at step "
                f"{self.step} (hosts {hosts}); global batch stays {self.plan.global_batch}",
                flush=True,
            )
        self.world_sizes.append([self.step, self.world, hosts])

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        if not hasattr(self.train_loader, "num_samples"):
            from mmt.config import ConfigError

            raise ConfigError(
                self.source,
                "train.epochs",
                "this loader does not know the training set size "
                "(data.loader=streaming); set train.max_steps",
            )
        n = self.train_loader.num_samples
        steps_per_epoch = n // self.plan.global_batch
        if steps_per_epoch == 0:
            from mmt.config import ConfigError

            raise ConfigError(
                self.source,
                "train.epochs",
                f"the training set has {n} samples, fewer than one global batch ({self.plan.global_batch})",
            )
        return max(1, math.ceil(t.epochs * steps_per_epoch))

    def _log_run_start(self) -> None:
        cfg_path = save_config(self.cfg, self.run_dir / "config.yaml")
        patterns = secret_patterns(self.cfg.tracking.redact_keys)
        ds_path = atomic_write_text(
            self.run_dir / "ds_config.json", json.dumps(redact(self.ds_config, patterns), indent=2) + "\n"
        )
        self.logger.log_params(flatten(redacted_config(self.cfg)))
        tags = system_tags(self.env, self.device)
        tags.update(
            {
                "mmt.run_dir": str(self.run_dir),
                "mmt.checkpoint_dir": str(self.ckpt.root),
                "mmt.task": self.cfg.train.task,
                "mmt.hostnames": ",".join(sorted(set(self._hostnames))),
                "mmt.num_parameters": str(self.num_parameters),
                "mmt.global_batch": str(self.plan.global_batch),
                "mmt.micro_batch": str(self.plan.micro_batch),
                "mmt.grad_accum": str(self.plan.grad_accum),
                "mmt.world_sizes": format_world_sizes(self.world_sizes),
            }
        )
        for step, world, *hosts in self.world_sizes:
            tags[f"mmt.world_size.{step}"] = f"{world} ranks on {hosts[0] if hosts and hosts[0] else '?'}"
        if self.resume_dir is not None:
            tags["mmt.resumed_from"] = str(self.resume_dir)
        if self.ds_conflicts:
            tags["mmt.ds_config_conflicts"] = "; ".join(self.ds_conflicts)
        self.logger.set_tags(tags)
        self.logger.log_artifact(cfg_path)
        self.logger.log_artifact(ds_path)
        print(
            f"mmt: run dir {self.run_dir} | world size {self.world} ({self.env.launcher}, {self.device.type}) | "
            f"{self.num_parameters / 1e6:.2f}M params | global batch {self.plan.global_batch} = "
            f"{self.plan.micro_batch} x {self.plan.grad_accum} x {self.world} | ZeRO {self.cfg.train.zero_stage} "
            f"{self.cfg.train.precision} | MLflow run {self.logger.run_id}",
            flush=True,
        )

    # ------------------------------------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[dict[str, Any]]:
        """Training batches forever: a new epoch starts when the loader's epoch ends."""
        while True:
            got = False
            for batch in self.train_loader:
                got = True
                yield batch
            if not got:
                raise RuntimeError(
                    "the training loader yielded no batch in a whole epoch (fewer samples than one "
                    f"global batch of {self.plan.global_batch}?)"
                )

    def _record_keys(self, batch: dict[str, Any]) -> None:
        path = self.run_dir / "keys" / f"rank_{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.step, "keys": list(batch.get("keys", []))}) + "\n")

    def _eval(self) -> dict[str, float]:
        t = self.cfg.train
        batch = t.eval_batch or self.plan.micro_batch
        loader = self.eval_loader_factory(self.cfg, self.rank, self.world, batch)
        try:
            with torch.random.fork_rng(devices=[]):  # evaluation never shifts the training random streams
                metrics = evaluate(
                    self.engine,
                    self.task,
                    loader,
                    self.device,
                    self.dtype,
                    t.eval_max_batches,
                )
        finally:
            close = getattr(loader, "close", None)
            if callable(close):
                close()
        self.logger.log(metrics, self.step)
        return metrics

    def _save(self) -> Path:
        rng = D.gather_objects(capture_rng())
        loader_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        loader_states = D.gather_objects(loader_state)
        client = ClientState(
            step=self.step,
            samples_seen=self.samples_seen,
            rng_states=rng,
            loader_states=loader_states,
            mlflow_run_id=self.run_id,
            world_size=self.world,
            world_sizes=self.world_sizes,
        ).to_client_state()
        meta = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.world,
            "zero_stage": self.ds_config["zero_optimization"]["stage"],
            "dtype": self.cfg.train.precision,
            "mlflow_run_id": self.run_id,
            "config": redacted_config(self.cfg),
            "task": self.cfg.train.task,
            "global_batch": self.plan.global_batch,
            "time": time.time(),
        }
        path = self.ckpt.save(self.engine, self.step, client, meta)
        return path

    def _loop(self) -> TrainResult:
        t = self.cfg.train
        has_val = bool(self.cfg.data.val_urls)
        preempt = self._preempt
        bar = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        peak = peak_flops_per_device(self.device, t.precision, t.peak_tflops)
        meter = StepMeter()
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        last_ckpt: Path | None = self.resume_dir
        batches = self._batches()
        self.engine.train()
        try:
            while self.step < self.total_steps:
                if preempt.should_stop(self.device):
                    last_ckpt = self._save()
                    got = D.gather_objects(preempt.received.name if preempt.received else None)
                    signame = ",".join(sorted({g for g in got if g})) or "unknown"
                    if self.rank == 0:
                        write_marker(self.run_dir, self.step, str(last_ckpt), signame)
                        # Which ranks the signal itself reached: the flag is all-reduced, so every rank stops
                        # either way, but a launcher that does not forward the signal to every node shows here.
                        reached = sorted({self._hostnames[r] for r, g in enumerate(got) if g})
                        print(
                            f"mmt: preempted ({signame}) at step {self.step}; the signal reached "
                            f"{sum(1 for g in got if g)} of {self.world} ranks (on {','.join(reached)}); "
                            f"checkpoint {last_ckpt}; exit {PREEMPTED_EXIT_CODE}",
                            flush=True,
                        )
                        self.logger.set_tags({"mmt.preempted_at_step": str(self.step)})
                    return TrainResult(
                        PREEMPTED_EXIT_CODE,
                        self.step,
                        self.samples_seen,
                        self.run_dir,
                        last_ckpt,
                        self.run_id,
                        last_train,
                        last_eval,
                        preempted=True,
                    )
                with torch.random.fork_rng(devices=[]):
                    # Creating a DataLoader iterator draws from the global torch RNG; keep those draws out of the
                    # model's stream, or a resumed run (new iterator mid-epoch) would drift from an uninterrupted one.
                    batch = meter.data.fetch(batches, self.device)
                if t.record_keys:
                    self._record_keys(batch)
                log_now = (self.step + 1) % t.log_interval == 0 or self.step + 1 == self.total_steps
                for micro in split_micro(batch, self.plan.grad_accum):
                    res = self.task.step(self.engine, micro, self.device, self.dtype)
                    self.engine.backward(res.loss)
                    if log_now and self.engine.is_gradient_accumulation_boundary():
                        self._step_lr = float(self.engine.get_lr()[0])  # the lr this step applies
                        if self._own_grad_norm:
                            self._grad_norm = grad_norm(self.engine.module)
                    self.engine.step()
                    meter.add(res.metrics)
                    meter.tokens += count_tokens(res.kwargs, res.present, self.tokens_per_sample)
                meter.data.step_done()
                self.step += 1
                self.samples_seen += self.plan.global_batch
                meter.samples += self.plan.global_batch
                if bar is not None:
                    bar.update(1)

                if self.step % t.log_interval == 0 or self.step == self.total_steps:
                    last_train = self._log_train(meter, peak)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{last_train.get('train/loss', float('nan')):.4f}", refresh=False
                        )
                    meter = StepMeter()
                if (
                    has_val
                    and t.eval_interval
                    and self.step % t.eval_interval == 0
                    and self.step < self.total_steps
                ):
                    last_eval = self._eval()
                    self.engine.train()
                if (
                    t.checkpoint_interval
                    and self.step % t.checkpoint_interval == 0
                    and self.step < self.total_steps
                ):
                    last_ckpt = self._save()
            if has_val and (t.eval_at_end or t.eval_interval):
                last_eval = self._eval()
            if t.checkpoint_at_end or t.checkpoint_interval:
                last_ckpt = self._save()
        finally:
            if bar is not None:
                bar.close()
        return TrainResult(
            0, self.step, self.samples_seen, self.run_dir, last_ckpt, self.run_id, last_train, last_eval
        )

    def _log_train(self, meter: StepMeter, peak: float | None) -> dict[str, float]:
        means, tokens, elapsed = meter.reduce(self.device)
        metrics = {f"train/{k}": v for k, v in means.items()}
        sps = meter.samples / max(elapsed, 1e-9)
        metrics["train/lr"] = self._step_lr
        gn = self._grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        if gn is not None:
            metrics["train/grad_norm"] = float(gn)
        metrics["train/samples_per_s"] = sps
        metrics["train/tokens_per_s"] = tokens / max(elapsed, 1e-9)
        metrics["train/epoch"] = float(getattr(self.train_loader, "epoch", 0))
        u = mfu(self.flops_per_sample, sps, self.world, peak)
        if u is not None:
            metrics["train/mfu"] = u
        if self.cfg.tracking.log_system_metrics:
            metrics.update(memory_metrics(self.device))
            metrics.update(self._node_meter.reduce(self.train_loader))
        self.logger.log(metrics, self.step)
        return metrics

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        status = FAILED
        preempted = False
        # Installed first: a SIGTERM during the (slow) setup is honoured at the first step boundary.
        self._preempt = PreemptionFlag(parse_signals(self.cfg.train.preempt_signals))
        try:
            self._setup()
            result = self._loop()
            preempted = result.preempted
            status = KILLED if preempted else FINISHED
            if self.rank == 0 and not result.preempted:
                self._write_final(result)
            return result
        except KeyboardInterrupt:
            status = KILLED
            raise
        finally:
            if preempted:
                # The checkpoint is complete and every rank is leaving: a launcher's SIGTERM (srun kills the other
                # ranks when the first exits with 75) must not cut the rest of this shutdown short.
                self._preempt.shield()
            else:
                self._preempt.restore()
            with suppress(Exception):
                self.logger.close(status)
            close = getattr(getattr(self, "train_loader", None), "close", None)
            if callable(close):
                with suppress(Exception):
                    close()
            # The engine holds the process groups, and its ZeRO optimizer is kept alive by the gradient hooks it
            # left on the parameters (a cycle through autograd that Python's collector cannot see): release it
            # with DeepSpeed's `destroy` first, so the teardown frees the groups and joins their threads before
            # the interpreter shuts down (see `destroy_process_groups`).
            engine, self.engine = getattr(self, "engine", None), None
            if engine is not None:
                with suppress(Exception):
                    engine.destroy()
                del engine
            # After a failure peers may be gone: no barrier, just release the groups.
            with suppress(Exception) if status == FAILED else nullcontext():
                D.teardown_distributed(getattr(self, "_created_pg", False), sync=status != FAILED)

    def _write_final(self, result: TrainResult) -> None:
        final = {
            "step": result.step,
            "samples_seen": result.samples_seen,
            "train": result.train_metrics,
            "eval": result.eval_metrics,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "mlflow_run_id": self.run_id,
            "tracking_uri": getattr(self._mlflow(), "uri", None),
        }
        path = atomic_write_text(self.run_dir / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        self.logger.log_artifact(path)

    def _mlflow(self) -> Any:
        for lg in getattr(self.logger, "loggers", []):
            if hasattr(lg, "uri"):
                return lg
        return None


def format_world_sizes(history: list[list]) -> str:
    """``[[0, 3, "node1,node2,node3"], [4, 2, "node1,node2"]]`` -> ``"0:3,4:2"`` (step:world size, in order).

    The tag value: each entry is where the run (re)started on a different world size; the hosts of each
    change are in the tags ``mmt.world_size.<step>``."""
    return ",".join(f"{step}:{world}" for step, world, *_ in history)


def train(cfg: Config, source: str = "config", **factories: Any) -> TrainResult:
    """Run training for ``cfg`` on this rank (call it on every rank); returns once the run ends."""
    return Trainer(cfg, source, **factories).run()


__all__ = ["TrainResult", "Trainer", "dump_yaml", "split_micro", "train"]
