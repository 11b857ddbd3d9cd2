"""Typed configuration of training: the `train.*` section.

Everything a run needs besides the model, the data and the tracker: task, batch arithmetic, optimiser and
schedule, precision, ZeRO settings, intervals, resume and preemption. The DeepSpeed JSON is generated from it
(`mmt.training.engine`), so this section stays the single source of truth; a user's own ds_config JSON may
still be merged on top, with conflicts reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmt.config.errors import ConfigError
from mmt.config.fields import cfg_field
from mmt.config.preemption import parse_signals
from mmt.config.tasks import TASK_NAMES, TasksConfig


@dataclass
class OptimizerConfig:
    """AdamW with two parameter groups: weights decay, norms / biases / embeddings do not."""

    lr: float = cfg_field(1e-3, doc="peak learning rate (reached after warmup)", gt=0)
    weight_decay: float = cfg_field(
        0.05, doc="decoupled weight decay of matrices (norms, biases, embeddings get 0)", ge=0
    )
    beta1: float = cfg_field(0.9, doc="Adam beta1", ge=0, le=1)
    beta2: float = cfg_field(0.98, doc="Adam beta2", ge=0, le=1)
    eps: float = cfg_field(1e-6, doc="Adam epsilon", gt=0)
    torch_adam: bool = cfg_field(
        False, doc="torch's AdamW on GPU too (no JIT-compiled DeepSpeed FusedAdam); always used on CPU"
    )


@dataclass
class ScheduleConfig:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step (or constant)."""

    kind: str = cfg_field("cosine", doc="learning-rate schedule after warmup", choices=("cosine", "constant"))
    warmup_steps: int = cfg_field(0, doc="optimizer steps of linear warmup from warmup_init_ratio * lr", ge=0)
    warmup_init_ratio: float = cfg_field(0.0, doc="lr at step 0 as a fraction of the peak", ge=0, le=1)
    min_lr_ratio: float = cfg_field(0.1, doc="cosine floor as a fraction of the peak lr", ge=0, le=1)


@dataclass
class TrainConfig:
    task: str = cfg_field("retrieval", doc="training task (mmt.config.tasks)", choices=TASK_NAMES)
    tasks: TasksConfig = cfg_field(
        default_factory=TasksConfig, doc="each task's own settings, train.tasks.<name> (mmt.config.tasks)"
    )
    seed: int = cfg_field(0, doc="global seed")
    run_dir: str = cfg_field(
        "runs/${tracking.run_name}", doc="where checkpoints, logs and the resolved config go"
    )

    # Batch arithmetic: global_batch = micro_batch * grad_accum * world_size. Any two determine the third
    # (0 = derive); with only one of global_batch / micro_batch given, grad_accum is 1.
    global_batch: int = cfg_field(32, doc="samples per optimizer step over all ranks (0: derived)", ge=0)
    micro_batch: int = cfg_field(0, doc="samples per forward/backward per rank (0: derived)", ge=0)
    grad_accum: int = cfg_field(
        0, doc="micro batches accumulated per optimizer step (0: derived, 1 if only one other is given)", ge=0
    )

    max_steps: int = cfg_field(
        100, doc="optimizer steps to train (0: from epochs and the training set size)", ge=0
    )
    epochs: float = cfg_field(0.0, doc="passes over the training set when max_steps is 0", ge=0)

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float = cfg_field(1.0, doc="clip the global gradient norm to this (0: no clipping)", ge=0)

    precision: str = cfg_field(
        "fp32",
        doc="fp32, bf16 (mixed, no loss scale) or fp16 (mixed, dynamic loss scale)",
        choices=("fp32", "bf16", "fp16"),
    )
    loss_scale: float = cfg_field(0.0, doc="fp16 only: static loss scale (0: dynamic)", ge=0)
    initial_scale_power: int = cfg_field(16, doc="fp16 dynamic loss scale starts at 2**this", ge=0)

    zero_stage: int = cfg_field(2, doc="DeepSpeed ZeRO stage (0: plain data parallel)", ge=0, le=3)
    offload_optimizer: bool = cfg_field(
        False, doc="ZeRO-Offload: optimizer states and step on the CPU (stage >= 1)"
    )
    offload_params: bool = cfg_field(False, doc="ZeRO-Infinity: parameters live on the CPU (stage 3 only)")
    activation_checkpointing: bool = cfg_field(
        False, doc="recompute TransformerBlock activations in backward"
    )
    ds_config: str = cfg_field(
        "", doc="a DeepSpeed JSON merged over the generated one (conflicts are reported)"
    )
    ds_config_override: bool = cfg_field(
        False, doc="on a conflict with ds_config, take the user's value instead of stopping"
    )

    device: str = cfg_field(
        "auto", doc="auto (cuda when available), cuda or cpu", choices=("auto", "cuda", "cpu")
    )
    dist_backend: str = cfg_field(
        "auto",
        doc="process-group backend: auto (nccl on cuda, gloo on cpu), nccl, gloo",
        choices=("auto", "nccl", "gloo"),
    )
    dist_timeout_s: int = cfg_field(
        600,
        doc="collective timeout in seconds: how long a rank waits for its peers in a collective (a silent "
        "peer, a lost node); must cover rank 0 converting a checkpoint for another world size",
        ge=1,
    )
    rdzv_timeout_s: int = cfg_field(
        300,
        doc="rendezvous timeout in seconds: how long the ranks (srun, deepspeed launcher) or the torchrun node "
        "agents (`mmt slurm submit --launch torchrun`) wait for every rank or node to join at start-up",
        ge=1,
    )

    # Intervals (in optimizer steps; 0 disables).
    log_interval: int = cfg_field(10, doc="console line and MLflow metrics every N steps", ge=1)
    eval_interval: int = cfg_field(
        0, doc="evaluate on data.val_urls every N steps (and at the end when > 0)", ge=0
    )
    eval_at_end: bool = cfg_field(True, doc="evaluate after the last step when data.val_urls is set")
    eval_max_batches: int = cfg_field(0, doc="cap on eval batches per rank (0: the whole held-out set)", ge=0)
    eval_batch: int = cfg_field(0, doc="samples per eval batch per rank (0: the training micro batch)", ge=0)
    checkpoint_interval: int = cfg_field(
        0, doc="save a checkpoint every N steps (the last step always saves)", ge=0
    )
    checkpoint_at_end: bool = cfg_field(True, doc="save a checkpoint after the last step")
    keep_last: int = cfg_field(3, doc="complete checkpoints kept (older ones are deleted; 0 keeps all)", ge=0)
    resume: str = cfg_field(
        "",
        doc="'' (fresh start), 'auto' (newest complete checkpoint in run_dir, if any) or "
        "a checkpoint path (run dir, checkpoints/ or a step_XXXXXXXX folder)",
    )
    init_weights: str = cfg_field(
        "",
        doc="start a fresh run from consolidated weights (an `mmt ckpt convert` folder or a .safetensors file); "
        "strict names and shapes; ignored when resuming",
    )
    init_weights_only: list[str] = cfg_field(
        default_factory=list,
        doc="towers (text, image, audio) or name prefixes to take from init_weights ([]: all; a comma-separated "
        "string is accepted)",
    )
    trust_checkpoint: bool = cfg_field(
        False,
        doc="load the resume checkpoint and init_weights with full pickle (may run code stored in the files); "
        "false: only tensors and the classes DeepSpeed checkpoints hold",
    )

    # Preemption: signals set a flag; at the next step boundary every rank saves and the run exits.
    preempt_signals: list[str] = cfg_field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        doc="signals that trigger save-and-exit ([] disables; a comma-separated string is accepted)",
    )

    # Performance accounting and console.
    peak_tflops: float = cfg_field(
        0.0, doc="peak TFLOP/s per device for MFU (0: look up the GPU; none on CPU)", ge=0
    )
    progress_bar: bool = cfg_field(True, doc="tqdm bar with ETA on rank 0")
    record_keys: bool = cfg_field(
        False, doc="append each step's sample keys to <run_dir>/keys/rank_XXXXX.jsonl (audits exact resume)"
    )
    torch_threads: int = cfg_field(
        0, doc="torch intra-op threads per process on CPU (0: leave torch's choice)", ge=0
    )

    def check(self, source: str, prefix: str) -> None:
        if self.global_batch == 0 and self.micro_batch == 0:
            raise ConfigError(
                source,
                f"{prefix}global_batch",
                "set train.global_batch or train.micro_batch (> 0); with train.grad_accum they "
                "determine each other through the world size",
            )
        if self.global_batch and self.micro_batch and self.global_batch % self.micro_batch:
            raise ConfigError(
                source,
                f"{prefix}global_batch",
                f"{self.global_batch} is not a multiple of train.micro_batch={self.micro_batch}",
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                source, f"{prefix}offload_params", f"needs train.zero_stage=3 (got {self.zero_stage})"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(source, f"{prefix}offload_optimizer", "needs train.zero_stage >= 1 (got 0)")

        try:
            parse_signals(self.preempt_signals)
        except ValueError as e:
            raise ConfigError(source, f"{prefix}preempt_signals", str(e)) from None
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError(
                source, f"{prefix}max_steps", "set train.max_steps or train.epochs (both are 0)"
            )
