"""The trainer, in torchtitan's shape: `Trainer.__init__` builds everything from small ``build_*`` steps, `run`
loops over `train_step` with `maybe_preempt` / `maybe_evaluate` / `maybe_checkpoint` around it, and `close`
releases what was built, whatever happened.

`train(cfg)` is what `mmt train` calls on every rank. It works the same as a single process, under torchrun,
under the deepspeed launcher and under srun, on CPU (gloo) and CUDA (nccl): `mmt.training.distributed` maps each
launcher onto one set of rank variables. Task losses, evaluation, checkpoints, preemption and telemetry each
live in their own module; the loaders are reached through `mmt.data.protocol.TrainLoader`.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmt.atomic import atomic_write_text
from mmt.ckpt.client_state import ClientState
from mmt.ckpt.layout import read_meta
from mmt.ckpt.manager import CheckpointManager, resume_point
from mmt.ckpt.pretrained import init_weights
from mmt.ckpt.resume import ResumePlan, load_for_resume
from mmt.ckpt.torchio import checkpoint_loading
from mmt.config import Config, ConfigError, flatten, save_config, to_dict
from mmt.config.loader import dump_yaml, redacted_config
from mmt.config.preemption import PREEMPTED_EXIT_CODE, parse_signals
from mmt.data.loader import build_eval_loader, build_train_loader
from mmt.data.protocol import EvalLoader, TrainLoader
from mmt.model.factory import create_model
from mmt.precision import torch_dtype
from mmt.secrets import redact, secret_patterns
from mmt.tracking.logger import FAILED, FINISHED, KILLED, Logger, MultiLogger, RedactingLogger
from mmt.tracking.mlflow_logger import MLflowLogger
from mmt.training import distributed as D
from mmt.training.activation_checkpointing import apply_activation_checkpointing
from mmt.training.batching import BatchPlan, resolve_batch
from mmt.training.engine import destroy, initialize_for_training, resolve_ds_config
from mmt.training.evaluate import evaluate
from mmt.training.flops import mfu, peak_flops_per_device
from mmt.training.inputs import batch_size, count_tokens
from mmt.training.preemption import PreemptionFlag, clear_marker, write_marker
from mmt.training.progress import ProgressBar
from mmt.training.resume import drop_converted, plan_resume
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

LoaderFactory = Callable[[Config, int, int, BatchPlan], TrainLoader]
EvalLoaderFactory = Callable[[Config, int, int, int], EvalLoader]


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


def default_train_loader(cfg: Config, rank: int, world_size: int, plan: BatchPlan) -> TrainLoader:
    return build_train_loader(cfg, rank, world_size, plan.global_batch)


def default_eval_loader(cfg: Config, rank: int, world_size: int, batch: int) -> EvalLoader:
    return build_eval_loader(cfg, rank, world_size, batch)


class Trainer:
    """One run on this rank. Everything it holds is built in `__init__`; `run` trains and then `close`s.

    ``train_loader_factory`` / ``eval_loader_factory`` replace the shard loaders (tests, other data sources):
    anything satisfying `TrainLoader` / `EvalLoader` will do.
    """

    def __init__(
        self,
        cfg: Config,
        source: str = "config",
        train_loader_factory: LoaderFactory | None = None,
        eval_loader_factory: EvalLoaderFactory | None = None,
    ) -> None:
        t = cfg.train
        self.cfg, self.source = cfg, source
        self.eval_loader_factory = eval_loader_factory or default_eval_loader
        # Each build step below registers the release of what it built here; `close` runs them newest first,
        # so a failure halfway through the build releases exactly what exists. `status` is how the run ended.
        self.resources = ExitStack()
        self.status = FAILED
        # First: a SIGTERM during the (slow) build is honoured at the first step boundary.
        self.preempt = PreemptionFlag(parse_signals(t.preempt_signals))
        try:
            self.env, self.device = self.build_distributed()
            self.rank, self.world = self.env.rank, self.env.world_size
            self.node_meter = NodeMeter(self.env)
            self.hostnames: list[str] = D.gather_objects(socket.gethostname())
            plan = resolve_batch(t, self.world, source)  # a bad batch setting stops here, before any write
            self.dtype = torch_dtype(t.precision)
            self.run_dir = self.build_run_dir()
            self.plan, self.ds_config, self.ds_conflicts = self.build_ds_config(plan)
            self.resume_dir, self.resume_plan, resumed_run_id = self.build_resume()
            self.task: Task = build_task(cfg.model, t)
            model = self.build_model()
            # Before DeepSpeed: ZeRO-3 partitions parameters, after which numel() no longer counts them.
            self.flops_per_sample = self.task.flops_per_sample(model.flops_per_sample())
            self.tokens_per_sample, self.num_parameters = model.tokens_per_sample(), model.num_parameters()
            self.train_loader = self.build_train_loader(train_loader_factory or default_train_loader)
            self.total_steps = total_steps(cfg, self.train_loader, self.plan, source)
            self.logger = self.build_logger(resumed_run_id)
            self.run_id: str | None = D.broadcast_object(self.logger.run_id)
            self.engine = self.build_engine(model)
            self.ckpt = CheckpointManager(self.run_dir, t.keep_last, self.rank)
            # The loop's state: where the run is, the meter of the current log interval, the last results.
            self.step, self.samples_seen, self.world_sizes = self.build_position()
            self.batches = self.batches_forever()
            self.meter = StepMeter()
            self.peak_flops = peak_flops_per_device(self.device, t.precision, t.peak_tflops)
            self.step_lr = float("nan")  # the lr and (`own_grad_norm`) grad norm of the step logged next
            self.grad_norm: float | None = None
            self.last_train: dict[str, float] = {}
            self.last_eval: dict[str, float] = {}
            self.last_checkpoint: Path | None = self.resume_dir
            if self.rank == 0:
                clear_marker(self.run_dir)
                self.log_run_start()
        except BaseException as e:
            self.close(KILLED if isinstance(e, KeyboardInterrupt) else FAILED)
            raise

    @property
    def own_grad_norm(self) -> bool:
        """ZeRO-0 fp32 does not keep the norm it clips with: measure it (grads are all-reduced by then)."""
        return self.cfg.train.zero_stage == 0 and self.cfg.train.precision == "fp32"

    # ------------------------------------------------------------------------------------------------ build
    def build_distributed(self) -> tuple[D.DistEnv, torch.device]:
        """The process group (through DeepSpeed) and this rank's device; released last by `close`."""
        t = self.cfg.train
        # DeepSpeed's ZeRO collectives call torch APIs that torch now flags on every step; not actionable here.
        warnings.filterwarnings(
            "ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        env, device, created = D.setup_distributed(
            t.device, t.dist_backend, t.dist_timeout_s, t.rdzv_timeout_s
        )
        self.resources.callback(self.teardown_distributed, created)
        return env, device

    def build_run_dir(self) -> Path:
        run_dir = Path(self.cfg.train.run_dir).resolve()
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        return run_dir

    def build_ds_config(self, plan: BatchPlan) -> tuple[BatchPlan, dict[str, Any], list[str]]:
        """The DeepSpeed config: generated, then the user's JSON merged over it (conflicts reported once); the
        batch plan as the merged config fixes it."""
        resolved = resolve_ds_config(self.cfg.train, plan, self.device, self.source)
        if resolved.conflicts and self.rank == 0:
            print(
                "mmt: train.ds_config overrides the generated DeepSpeed config:\n  "
                + "\n  ".join(resolved.conflicts),
                file=sys.stderr,
            )
        return resolved.plan, resolved.config, resolved.conflicts

    def build_resume(self) -> tuple[Path | None, ResumePlan | None, str | None]:
        """The checkpoint to resume from (rank 0 decides, every rank follows), how it loads here (patched into
        the DeepSpeed config) and the MLflow run it logged to.

        Same world size: DeepSpeed's files load as saved; another world size: rank 0 converts them to a universal
        checkpoint first; anything that would not load exactly is refused here, before any work."""
        t = self.cfg.train
        tag_dir = resume_point(t.resume, self.run_dir) if self.rank == 0 else None
        tag_dir = D.broadcast_object(str(tag_dir) if tag_dir else None)
        if tag_dir is None:
            return None, None, None
        meta = read_meta(Path(tag_dir))
        stage = self.ds_config["zero_optimization"]["stage"]
        with checkpoint_loading(t.trust_checkpoint):
            plan = plan_resume(Path(tag_dir), self.world, self.rank, stage, to_dict(self.cfg), self.run_dir)
        self.ds_config.setdefault("checkpoint", {}).update(plan.ds_config_patch()["checkpoint"])
        return Path(tag_dir), plan, meta.get("mlflow_run_id")

    def build_model(self) -> torch.nn.Module:
        """The model with identical initial weights on every rank (``train.seed``, or ``train.init_weights``);
        then every rank's random streams are seeded apart."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        model = create_model(self.cfg.model)
        if self.resume_dir is None and t.init_weights:
            with checkpoint_loading(t.trust_checkpoint):
                init_weights(model, t.init_weights, t.init_weights_only)
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        seed_everything(t.seed, self.rank)  # identical weights everywhere, then per-rank random streams
        return model

    def build_train_loader(self, factory: LoaderFactory) -> TrainLoader:
        loader = factory(self.cfg, self.rank, self.world, self.plan)
        self.resources.callback(suppressed, loader.close)
        return loader

    def build_logger(self, run_id: str | None) -> Logger:
        """Rank 0 opens (or, resuming, reopens) the MLflow run; the other ranks only learn its id."""
        logger = build_logger(self.cfg, self.rank, run_id, self.total_steps, self.run_dir)
        self.resources.callback(lambda: suppressed(logger.close, self.status))
        return logger

    def build_engine(self, model: torch.nn.Module) -> Any:
        engine = initialize_for_training(model, self.cfg.train, self.ds_config, self.total_steps)
        self.resources.callback(self.destroy_engine)
        return engine

    def build_position(self) -> tuple[int, int, list[list]]:
        """Step, samples seen, and the world-size history: ``[step, world size, hostnames]`` each time the run
        (re)started on another world size (node losses and regrowth under Slurm, ``slurm.min_nodes``, show up
        here and in the tag ``mmt.world_sizes``). Zero for a new run, else restored from the checkpoint."""
        step, samples_seen, world_sizes = 0, 0, []
        if self.resume_plan is not None:
            step, samples_seen, world_sizes = self.restore(self.resume_plan)
        hosts = ",".join(sorted(set(self.hostnames)))
        if world_sizes and world_sizes[-1][1] != self.world and self.rank == 0:
            print(
                f"mmt: world size changed from {world_sizes[-1][1]} to {self.world} ranks at step {step} "
                f"(hosts {hosts}); global batch stays {self.plan.global_batch}",
                flush=True,
            )
        if not world_sizes or world_sizes[-1][1] != self.world:
            world_sizes.append([step, self.world, hosts])
        return step, samples_seen, world_sizes

    def restore(self, plan: ResumePlan) -> tuple[int, int, list[list]]:
        """Load the checkpoint into the engine, the loader's position and the RNG streams; returns the step,
        the samples seen and the world-size history it was saved with."""
        with checkpoint_loading(self.cfg.train.trust_checkpoint):  # DeepSpeed unpickles the files itself
            client = load_for_resume(self.engine, plan)
        drop_converted(plan, self.rank)
        state = ClientState.from_client_state(client)
        step, samples_seen = int(state.step), int(state.samples_seen)
        loader_state = state.rank_loader(self.rank)
        if loader_state is not None:
            self.train_loader.load_state_dict(loader_state)
        rng = state.rank_rng(self.rank)
        if rng is not None and plan.saved_world_size == self.world:
            restore_rng(rng)
        else:  # a rank the saved run did not have (or a different layout): a fresh, reproducible stream
            seed_everything(self.cfg.train.seed + 1_000_003 * step, self.rank)
        if self.rank == 0:
            print(
                f"mmt: resumed from {self.resume_dir} at step {step} ({samples_seen} samples): "
                f"{plan.describe()}",
                flush=True,
            )
        return step, samples_seen, [list(x) for x in state.world_sizes or [[0, plan.saved_world_size, ""]]]

    def log_run_start(self) -> None:
        """Rank 0: the resolved config and DeepSpeed JSON as artifacts, params, tags, and one console line."""
        cfg_path = save_config(self.cfg, self.run_dir / "config.yaml")
        patterns = secret_patterns(self.cfg.tracking.redact_keys)
        ds_path = atomic_write_text(
            self.run_dir / "ds_config.json", json.dumps(redact(self.ds_config, patterns), indent=2) + "\n"
        )
        self.logger.log_params(flatten(redacted_config(self.cfg)))
        self.logger.set_tags(self.run_tags())
        self.logger.log_artifact(cfg_path)
        self.logger.log_artifact(ds_path)
        print(
            f"mmt: run dir {self.run_dir} | world size {self.world} ({self.env.launcher}, {self.device.type}) | "
            f"{self.num_parameters / 1e6:.2f}M params | global batch {self.plan.global_batch} = "
            f"{self.plan.micro_batch} x {self.plan.grad_accum} x {self.world} | ZeRO {self.cfg.train.zero_stage} "
            f"{self.cfg.train.precision} | MLflow run {self.logger.run_id}",
            flush=True,
        )

    def run_tags(self) -> dict[str, str]:
        tags = system_tags(self.env, self.device)
        tags.update(
            {
                "mmt.run_dir": str(self.run_dir),
                "mmt.checkpoint_dir": str(self.ckpt.root),
                "mmt.task": self.cfg.train.task,
                "mmt.hostnames": ",".join(sorted(set(self.hostnames))),
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
        return tags

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train to ``total_steps`` (or to a preemption), then release everything, whatever happened."""
        status, preempted = FAILED, False
        try:
            result = self.train()
            preempted = result.preempted
            status = KILLED if preempted else FINISHED
            if self.rank == 0 and not preempted:
                self.write_final(result)
            return result
        except KeyboardInterrupt:
            status = KILLED
            raise
        finally:
            self.close(status, preempted)

    def train(self) -> TrainResult:
        """The loop: each step first checks for a preemption, then trains, logs, evaluates and saves when due."""
        self.meter = StepMeter()  # the first log interval's clock starts with the loop
        self.engine.train()
        with ProgressBar(self.rank == 0 and self.cfg.train.progress_bar, self.total_steps, self.step) as bar:
            while self.step < self.total_steps:
                if self.maybe_preempt():
                    return self.result(PREEMPTED_EXIT_CODE, preempted=True)
                self.train_step(self.next_batch())
                bar.update()
                self.maybe_log(bar)
                self.maybe_evaluate()
                self.maybe_checkpoint()
            self.finish()
        return self.result(0)

    def next_batch(self) -> dict[str, Any]:
        """The next batch on the device; the time this blocks is the step's data wait."""
        with torch.random.fork_rng(devices=[]):
            # Creating a DataLoader iterator draws from the global torch RNG; keep those draws out of the
            # model's stream, or a resumed run (new iterator mid-epoch) would drift from an uninterrupted one.
            batch = self.meter.data.fetch(self.batches, self.device)
        if self.cfg.train.record_keys:
            self.record_keys(batch)
        return batch

    def train_step(self, batch: dict[str, Any]) -> None:
        """One optimizer step on this rank's share of the global batch, in ``grad_accum`` micro batches."""
        log_now = (self.step + 1) % self.cfg.train.log_interval == 0 or self.step + 1 == self.total_steps
        for micro in split_micro(batch, self.plan.grad_accum):
            res = self.task.step(self.engine, micro, self.device, self.dtype)
            self.engine.backward(res.loss)
            if log_now and self.engine.is_gradient_accumulation_boundary():
                self.step_lr = float(self.engine.get_lr()[0])  # the lr this step applies
                if self.own_grad_norm:
                    self.grad_norm = grad_norm(self.engine.module)
            self.engine.step()
            self.meter.add(res.metrics)
            self.meter.tokens += count_tokens(res.kwargs, res.present, self.tokens_per_sample)
        self.meter.data.step_done()
        self.step += 1
        self.samples_seen += self.plan.global_batch
        self.meter.samples += self.plan.global_batch

    def maybe_preempt(self) -> bool:
        """When any rank got a preemption signal: every rank saves, rank 0 leaves the marker; True to stop."""
        if not self.preempt.should_stop(self.device):
            return False
        self.last_checkpoint = self.save()
        got = D.gather_objects(self.preempt.received.name if self.preempt.received else None)
        signame = ",".join(sorted({g for g in got if g})) or "unknown"
        if self.rank == 0:
            write_marker(self.run_dir, self.step, str(self.last_checkpoint), signame)
            # Which ranks the signal itself reached: the flag is all-reduced, so every rank stops either way,
            # but a launcher that does not forward the signal to every node shows here.
            reached = sorted({self.hostnames[r] for r, g in enumerate(got) if g})
            print(
                f"mmt: preempted ({signame}) at step {self.step}; the signal reached "
                f"{sum(1 for g in got if g)} of {self.world} ranks (on {','.join(reached)}); "
                f"checkpoint {self.last_checkpoint}; exit {PREEMPTED_EXIT_CODE}",
                flush=True,
            )
            self.logger.set_tags({"mmt.preempted_at_step": str(self.step)})
        return True

    def maybe_log(self, bar: ProgressBar) -> None:
        if self.step % self.cfg.train.log_interval and self.step != self.total_steps:
            return
        self.last_train = self.log_train()
        bar.show_loss(self.last_train.get("train/loss", float("nan")))
        self.meter = StepMeter()

    def maybe_evaluate(self) -> None:
        interval = self.cfg.train.eval_interval
        if self.cfg.data.val_urls and interval and self.step % interval == 0 and self.step < self.total_steps:
            self.last_eval = self.evaluate()
            self.engine.train()

    def maybe_checkpoint(self) -> None:
        interval = self.cfg.train.checkpoint_interval
        if interval and self.step % interval == 0 and self.step < self.total_steps:
            self.last_checkpoint = self.save()

    def finish(self) -> None:
        """After the last step: the final evaluation and checkpoint (when any are configured)."""
        t = self.cfg.train
        if self.cfg.data.val_urls and (t.eval_at_end or t.eval_interval):
            self.last_eval = self.evaluate()
        if t.checkpoint_at_end or t.checkpoint_interval:
            self.last_checkpoint = self.save()

    def result(self, exit_code: int, preempted: bool = False) -> TrainResult:
        return TrainResult(
            exit_code,
            self.step,
            self.samples_seen,
            self.run_dir,
            self.last_checkpoint,
            self.run_id,
            self.last_train,
            self.last_eval,
            preempted=preempted,
        )

    # ------------------------------------------------------------------------------------------------ steps
    def batches_forever(self) -> Iterator[dict[str, Any]]:
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

    def record_keys(self, batch: dict[str, Any]) -> None:
        path = self.run_dir / "keys" / f"rank_{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.step, "keys": list(batch.get("keys", []))}) + "\n")

    def log_train(self) -> dict[str, float]:
        """The interval's metrics, reduced over ranks (every rank takes part), logged by rank 0."""
        means, tokens, elapsed = self.meter.reduce(self.device)
        metrics = {f"train/{k}": v for k, v in means.items()}
        sps = self.meter.samples / max(elapsed, 1e-9)
        metrics["train/lr"] = self.step_lr
        gn = self.grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        if gn is not None:
            metrics["train/grad_norm"] = float(gn)
        metrics["train/samples_per_s"] = sps
        metrics["train/tokens_per_s"] = tokens / max(elapsed, 1e-9)
        metrics["train/epoch"] = float(self.train_loader.epoch)
        u = mfu(self.flops_per_sample, sps, self.world, self.peak_flops)
        if u is not None:
            metrics["train/mfu"] = u
        if self.cfg.tracking.log_system_metrics:
            metrics.update(memory_metrics(self.device))
            metrics.update(self.node_meter.reduce(self.train_loader))
        self.logger.log(metrics, self.step)
        return metrics

    def evaluate(self) -> dict[str, float]:
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
            loader.close()
        self.logger.log(metrics, self.step)
        return metrics

    def save(self) -> Path:
        """Every rank saves its shard; the client state carries every rank's RNG and loader position."""
        client = ClientState(
            step=self.step,
            samples_seen=self.samples_seen,
            rng_states=D.gather_objects(capture_rng()),
            loader_states=D.gather_objects(self.train_loader.state_dict()),
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
        return self.ckpt.save(self.engine, self.step, client, meta)

    def write_final(self, result: TrainResult) -> None:
        final = {
            "step": result.step,
            "samples_seen": result.samples_seen,
            "train": result.train_metrics,
            "eval": result.eval_metrics,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "mlflow_run_id": self.run_id,
            "tracking_uri": tracking_uri(self.logger),
        }
        path = atomic_write_text(self.run_dir / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        self.logger.log_artifact(path)

    # ------------------------------------------------------------------------------------------------ close
    def close(self, status: str, preempted: bool = False) -> None:
        """Release what `__init__` built, newest first: the engine, the tracker (ending its run with
        ``status``), the loader, the process group."""
        if preempted:
            # The checkpoint is complete and every rank is leaving: a launcher's SIGTERM (srun kills the other
            # ranks when the first exits with 75) must not cut the rest of this shutdown short.
            self.preempt.shield()
        else:
            self.preempt.restore()
        self.status = status
        self.resources.close()

    def destroy_engine(self) -> None:
        """The engine holds the process groups, and its ZeRO optimizer is kept alive by the gradient hooks it left
        on the parameters (a cycle through autograd that Python's collector cannot see), and ZeRO-3 keeps the
        model: release it through `mmt.training.engine.destroy` first, so the teardown frees the groups and joins
        their threads before the interpreter shuts down (see `destroy_process_groups`)."""
        engine, self.engine = self.engine, None
        suppressed(destroy, engine)
        del engine

    def teardown_distributed(self, created: bool) -> None:
        # After a failure peers may be gone: no barrier, just release the groups.
        with suppress(Exception) if self.status == FAILED else nullcontext():
            D.teardown_distributed(created, sync=self.status != FAILED)


def suppressed(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)``, ignoring its failure: one release failing must not skip the others."""
    with suppress(Exception):
        fn(*args)


def total_steps(cfg: Config, loader: TrainLoader, plan: BatchPlan, source: str) -> int:
    """``train.max_steps``, else ``train.epochs`` passes over the loader's samples (it must know how many)."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    n = loader.num_samples
    if n is None:
        raise ConfigError(
            source,
            "train.epochs",
            "this loader does not know the training set size (data.loader=streaming); set train.max_steps",
        )
    steps_per_epoch = n // plan.global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            source,
            "train.epochs",
            f"the training set has {n} samples, fewer than one global batch ({plan.global_batch})",
        )
    return max(1, math.ceil(t.epochs * steps_per_epoch))


def tracking_uri(logger: Logger) -> str | None:
    """The MLflow store rank 0 logs to (its URL user-info redacted), for ``final_metrics.json`` and the closing
    lines of ``mmt demo``; None without MLflow. `build_logger` wraps the backends in a `RedactingLogger`."""
    inner = logger.inner if isinstance(logger, RedactingLogger) else logger
    backends = inner.loggers if isinstance(inner, MultiLogger) else [inner]
    return next((redact(lg.uri, ()) for lg in backends if isinstance(lg, MLflowLogger)), None)


def format_world_sizes(history: list[list]) -> str:
    """``[[0, 3, "node1,node2,node3"], [4, 2, "node1,node2"]]`` -> ``"0:3,4:2"`` (step:world size, in order).

    The tag value: each entry is where the run (re)started on a different world size; the hosts of each
    change are in the tags ``mmt.world_size.<step>``."""
    return ",".join(f"{step}:{world}" for step, world, *_ in history)


def train(cfg: Config, source: str = "config", **factories: Any) -> TrainResult:
    """Run training for ``cfg`` on this rank (call it on every rank); returns once the run ends."""
    return Trainer(cfg, source, **factories).run()


__all__ = ["TrainResult", "Trainer", "dump_yaml", "split_micro", "train"]
