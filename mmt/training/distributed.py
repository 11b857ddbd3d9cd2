"""One way into torch.distributed for every launcher: single process, torchrun, the deepspeed launcher, srun.

Each launcher exports its own variables; `detect_env` maps them onto RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT so the same `mmt train` command runs unchanged under all of them, on CPU (gloo) and
CUDA (nccl). `setup_distributed` initialises the process group only when nobody else did, and
`teardown_distributed` only tears down what it created (tests and notebooks may own the group).
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds ``group=group.WORLD`` as a default argument when first imported; if that
# happens while a group exists (DeepSpeed imports it from deepspeed.initialize), ten of its functions hold the world
# group forever: destroy_process_group then cannot free it, and its gloo threads meet the interpreter's shutdown
# (seen: the one gloo group still alive after teardown). Imported with this module, before any group exists, they
# bind None.
import torch.distributed.nn  # noqa: F401
from torch.distributed.rendezvous import register_rendezvous_handler

from mmt.ds_compat import reset_comm_backend


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # single | torchrun | deepspeed | slurm | env
    master_addr: str
    master_port: int


PORT_ATTEMPTS = 5  # a single process retries its own port this often when another program took it first


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher() -> str:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return "slurm"
    return "single"


def detect_env() -> DistEnv:
    """Rank layout from the launcher's variables (srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID)."""
    env = os.environ
    launcher = _launcher()
    if launcher == "single":
        return DistEnv(0, 1, 0, 1, "single", "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port())
    if launcher == "slurm":
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", "0"))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or _slurm_local_world(
            world
        )
        addr = env.get("MASTER_ADDR")
        port = env.get("MASTER_PORT")
        if not addr or not port:
            raise RuntimeError(
                "srun launch: MASTER_ADDR and MASTER_PORT must be exported (e.g. MASTER_ADDR=$(scontrol show "
                "hostnames $SLURM_JOB_NODELIST | head -n1), MASTER_PORT=29500)"
            )
        return DistEnv(rank, world, local_rank, local_world, "slurm", addr, int(port))
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", "1")))
    return DistEnv(
        rank,
        world,
        local_rank,
        local_world,
        launcher,
        env.get("MASTER_ADDR", "127.0.0.1"),
        int(env.get("MASTER_PORT", "29500")),
    )


def _slurm_local_world(world: int) -> int:
    nodes = int(os.environ.get("SLURM_NNODES", "1") or 1)
    return max(1, world // max(1, nodes))


def select_device(kind: str, local_rank: int) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available, else the CPU."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "train.device=cuda but torch.cuda.is_available() is False (CPU-only torch or no GPU)"
        )
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def setup_distributed(
    device_kind: str = "auto", backend: str = "auto", timeout_s: int = 600, rdzv_timeout_s: int | None = None
) -> tuple[DistEnv, torch.device, bool]:
    """Export the rank variables, pick the device, and initialise the process group through DeepSpeed.

    Two bounds: ``rdzv_timeout_s`` (default ``timeout_s``) is how long a rank waits for every rank to join the
    rendezvous (rank 0's store, on MASTER_ADDR), ``timeout_s`` how long a collective waits for its peers. Returns
    (env, device, created): ``created`` is False when the group already existed (then it is left alone at
    teardown).
    """
    own_port = _launcher() == "single" and "MASTER_PORT" not in os.environ
    env = detect_env()
    _export(env)
    device = select_device(device_kind, env.local_rank)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _default_extensions_dir()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    import deepspeed

    if created:
        for attempt in range(PORT_ATTEMPTS):
            try:
                deepspeed.init_distributed(
                    dist_backend=backend,
                    timeout=timedelta(seconds=timeout_s),
                    auto_mpi_discovery=False,
                    verbose=False,
                    init_method=_rendezvous_url(rdzv_timeout_s or timeout_s),
                )
                break
            except dist.DistNetworkError as e:
                # A single process picks its own free port; another program may bind it before the store does.
                if not own_port or "EADDRINUSE" not in str(e) or attempt == PORT_ATTEMPTS - 1:
                    raise
                env = replace(env, master_port=free_port())
                _export(env)
    else:
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, verbose=False, dist_init_required=False
        )
    return env, device, created


RDZV_SCHEME = "mmt-env"


def _rendezvous_url(timeout_s: int) -> str:
    """An ``init_method`` for torch's env:// rendezvous whose wait is bounded by ``timeout_s`` (torch bounds it by
    the collective timeout); torch then sets the store's timeout to the collective one."""
    with contextlib.suppress(RuntimeError):  # registered by an earlier run in this process
        register_rendezvous_handler(RDZV_SCHEME, _env_rendezvous)
    return f"{RDZV_SCHEME}://?rdzv_timeout_s={timeout_s}"


def _env_rendezvous(url: str, timeout: timedelta = timedelta(minutes=10), **kwargs):
    """Rank 0 hosts the store on MASTER_ADDR:MASTER_PORT and waits for WORLD_SIZE ranks (under torchrun the agent
    hosts it); one clear error names the bound when a rank does not come (a lost node, a wrong MASTER_ADDR)."""
    limit = int(parse_qs(urlparse(url).query)["rdzv_timeout_s"][0])
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        store = dist.TCPStore(
            addr,
            port,
            world,
            is_master=rank == 0 and not agent_store,
            timeout=timedelta(seconds=limit),
            multi_tenant=True,
            use_libuv=env.get("USE_LIBUV", "1") == "1",
        )
    except dist.DistError as e:
        if "EADDRINUSE" in str(e):
            raise
        raise RuntimeError(
            f"rendezvous at {addr}:{port} (rank {rank} of {world}): not every rank joined within "
            f"train.rdzv_timeout_s={limit} s: {str(e).splitlines()[0]}"
        ) from e
    yield store, rank, world
    raise RuntimeError("unable to perform re-rendezvous using mmt-env:// method")


def _export(env: DistEnv) -> None:
    """The rank variables every library reads (torch's env:// rendezvous, DeepSpeed, loaders)."""
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )


def _default_extensions_dir() -> None:
    """Keep DeepSpeed's JIT-built ops beside the venv (launch/env.sh does the same) so they build once."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def teardown_distributed(created: bool, sync: bool = True) -> None:
    """Barrier (unless ``sync=False``: after a failure peers may be gone), then `destroy_process_groups`,
    only for a group `setup_distributed` created."""
    if not created or not dist.is_initialized():
        return
    try:
        if sync:
            dist.barrier()
    finally:
        destroy_process_groups()


def destroy_process_groups() -> None:
    """Destroy every process group and free them now, while the interpreter is whole.

    torch's ``destroy_process_group`` shuts the groups down, but a gloo group's C++ worker threads
    (``pt_gloo_runloop`` x2 per group, ``gloo_tcp_loop``) live until the group object is freed, and DeepSpeed
    keeps references of its own: its cloned world group and data-parallel group in ``deepspeed.utils.groups``, and
    the engine's ZeRO optimizer (kept alive by the gradient hooks it leaves on the parameters). Seen when a 2-rank
    ZeRO-2 `mmt train` returned: both gloo groups and their six threads still alive, left for interpreter shutdown
    to free; a rank that exits with live gloo groups can abort there ("terminate called without an active
    exception"). DeepSpeed's own ``deepspeed.comm.destroy_process_group`` drops its references with the groups,
    the trainer releases its engine first (``engine.destroy()`` removes the hooks), and the collection below frees
    what that left, so those group destructors join their threads here. The last holder was
    ``torch.distributed.nn.functional``'s default arguments: this module imports it before any group exists.
    """
    try:
        import deepspeed.comm as ds_dist

        if ds_dist.is_initialized():
            ds_dist.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()
    finally:
        _reset_deepspeed_comm()
        gc.collect()


def _reset_deepspeed_comm() -> None:
    # DeepSpeed keeps its comm backend after the group is destroyed; a later run in this process starts clean.
    reset_comm_backend()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (a MAX all-reduce: no rank is left waiting)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
