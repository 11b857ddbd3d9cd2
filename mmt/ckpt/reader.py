"""Read one DeepSpeed ZeRO checkpoint (stage 0-3) tensor by tensor, without ever holding the whole model.

DeepSpeed keeps the fp32 master weights as flat per-rank partitions inside ``*_optim_states.pt``:

* ZeRO-1/2: per param group, the concatenation over ranks of ``single_partition_of_fp32_groups[g]`` is one flat
  vector holding the parameters back to back (plus optional alignment padding after a parameter);
* ZeRO-3: every parameter is split into ``ceil(numel / W)`` pieces, rank ``r`` holding piece ``r``; each rank's
  ``fp32_flat_groups`` (split into sub-groups) holds its pieces back to back, in ``param_shapes`` order;
* ZeRO-0: the full module is in ``mp_rank_00_model_states.pt`` (bf16 runs keep fp32 masters in its optimizer).

`ZeroCheckpoint` validates the folder up front (every rank's file present and readable, partition sizes adding
up, the same stage and world size everywhere) and then yields ``(name, fp32 tensor)`` one at a time, reading
only the slices it needs from memory-mapped files and re-opening them every ``read_budget`` bytes so that
pages already copied out do not stay resident.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmt.ckpt.client_state import CLIENT_KEY
from mmt.ckpt.layout import META_FILE, CheckpointError, read_meta, resolve_tag_dir
from mmt.ckpt.torchio import load_pt

OPTIM = "optimizer_state_dict"
_RANK_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@dataclass
class Entry:
    """Where one output tensor lives in the checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the values as stored (params: fp32 masters)
    kind: str  # "param" | "frozen" | "buffer" | "shared" | "module"
    group: int = 0
    offset: int = 0  # ZeRO-1/2: offset in the group's global flat vector; ZeRO-3: offset in each rank's flat
    source: str = ""  # kind == "shared": the name it shares storage with

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class RankFile:
    rank: int
    path: Path


@dataclass
class _FlatReader:
    """Ranges of each rank's flat fp32 partition groups, from memory-mapped files re-opened every ``budget`` bytes."""

    files: list[Path]
    key: str
    budget: int
    _cache: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _read: int = 0

    def groups(self, rank: int) -> list[torch.Tensor]:
        if rank not in self._cache:
            sd = load_pt(self.files[rank])
            try:
                self._cache[rank] = list(sd[OPTIM][self.key])
            except (KeyError, TypeError):
                raise CheckpointError(
                    f"{self.files[rank]}: no {OPTIM}.{self.key} (not a ZeRO optimizer file)"
                ) from None
        return self._cache[rank]

    def read(self, rank: int, group: int, start: int, n: int, copy: bool = True) -> torch.Tensor:
        """The values; ``copy=False`` returns a view into the mapped file (kept alive by the view alone)."""
        out = self.groups(rank)[group][start : start + n]
        out = out.clone() if copy else out
        self._read += n * out.element_size()
        if self._read >= self.budget:
            self.release()
        return out

    def release(self) -> None:
        self._cache.clear()
        self._read = 0


def _partition_numel(numel: int, world: int) -> int:
    return math.ceil(numel / world)


def written_by_mmt(model_state: dict[str, Any], root: Path) -> bool:
    """Whether a tag folder without ``mmt_meta.json`` is an interrupted mmt save rather than another program's.

    mmt's saves put their client state under ``mmt`` (`mmt.ckpt.client_state`), and a run's other tags carry
    ``mmt_meta.json``; a plain DeepSpeed checkpoint has neither.
    """
    if isinstance(model_state.get(CLIENT_KEY), dict):
        return True
    return any((d / META_FILE).is_file() for d in root.iterdir() if d.is_dir())


def _optimizer_steps(optim: dict[str, Any]) -> tuple[float, ...]:
    """The optimizer's per-group step counts stored in one rank's ZeRO file (empty before the first step)."""
    inner = optim.get("optimizer_state_dict", optim.get("base_optimizer_state"))
    state = inner.get("state") if isinstance(inner, dict) else None
    if not isinstance(state, dict):
        return ()
    out = []
    for s in state.values():
        v = s.get("step") if isinstance(s, dict) else None
        if v is not None:
            out.append(float(v))
    return tuple(out)


class ZeroCheckpoint:
    """One tag folder of a DeepSpeed ZeRO checkpoint, validated and readable tensor by tensor.

    Two kinds of folders are accepted. mmt's own saves are complete only once ``mmt_meta.json`` (written last, after
    every rank finished) says so; one without it is an interrupted save and is refused. A checkpoint written by
    any other DeepSpeed program has no such marker, so its completeness is judged from DeepSpeed's own files:
    every rank's model and optimizer states present and loadable, all from the same save (world size, step and
    parameter shapes agree) and the partitions holding exactly what the parameter shapes need.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tag: str | None = None,
        *,
        require_meta: bool = True,
        read_budget: int = 64 << 20,
    ) -> None:
        self.dir = resolve_tag_dir(path, tag)
        self.root, self.tag = self.dir.parent, self.dir.name
        self.read_budget = read_budget
        self.notes: list[str] = []
        self.meta: dict[str, Any] | None
        try:
            self.meta = read_meta(self.dir)
            meta_error = None
        except CheckpointError as e:
            self.meta, meta_error = None, e
        self._discover()
        self.made_by_mmt = (self.dir / META_FILE).is_file() or written_by_mmt(self.model_state, self.root)
        if self.made_by_mmt and self.meta is None and require_meta:
            raise meta_error  # type: ignore[misc]
        self._check_same_save()
        self._build_entries()
        if self.stage == 3:
            self._check_stage3_span()

    # ---------------------------------------------------------------- discovery and validation
    def _discover(self) -> None:
        d = self.dir
        if (d / "zero").is_dir():
            raise CheckpointError(
                f"{d}: a universal checkpoint (made by `mmt ckpt to-universal`); convert the original ZeRO checkpoint"
            )
        model_files: dict[int, Path] = {}
        optim_files: dict[int, Path] = {}
        for f in d.iterdir():
            m = _RANK_RE.match(f.name)
            if m:
                if int(m.group(2)) != 0:
                    raise CheckpointError(
                        f"{f}: tensor/pipeline-parallel checkpoints (mp_rank > 0) are not supported"
                    )
                (model_files if m.group(3) == "model" else optim_files)[int(m.group(1))] = f
            elif f.name.endswith("_model_states.pt") and f.name != "mp_rank_00_model_states.pt":
                raise CheckpointError(
                    f"{f}: unsupported checkpoint file (tensor-, pipeline- or expert-parallel)"
                )
        mp0 = d / "mp_rank_00_model_states.pt"
        meta_stage = None if self.meta is None else self.meta.get("zero_stage")
        meta_world = None if self.meta is None else self.meta.get("world_size")
        if model_files:
            self.stage = 3
        elif optim_files:
            self.stage = -1  # 1 or 2, read below
        elif mp0.is_file():
            self.stage = 0
        else:
            raise CheckpointError(f"{d}: no DeepSpeed model state files (*_model_states.pt) in this folder")
        if meta_stage == 3 and self.stage != 3 or meta_stage in (1, 2) and self.stage not in (-1,):
            expected = (
                "zero_pp_rank_<r>_mp_rank_00_model_states.pt"
                if meta_stage == 3
                else "zero_pp_rank_<r>_mp_rank_00_optim_states.pt"
            )
            raise CheckpointError(
                f"{d}: mmt_meta.json says zero_stage {meta_stage} but no {expected} files are here (missing rank files?)"
            )

        first = self.dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if self.stage == 3 else mp0.name)
        if self.stage == 3 and 0 not in model_files:
            raise CheckpointError(f"{first}: missing (rank 0's model states)")
        self.model_state = load_pt(first)
        if not isinstance(self.model_state, dict) or "module" not in self.model_state:
            raise CheckpointError(f"{first}: not a DeepSpeed model states file (no 'module')")
        ms = self.model_state
        self.model_file = first
        dp_world = int(ms.get("dp_world_size", 1))
        self.ds_config: dict[str, Any] = dict(ms.get("ds_config") or {})

        if self.stage == 0:
            self.world_size = int(meta_world or dp_world)
            self.optim_files: list[Path] = []
            self.model_files = [mp0]
        else:
            if not optim_files:
                raise CheckpointError(
                    f"{d}: no *_optim_states.pt files: the ZeRO optimizer partitions are missing"
                )
            if 0 not in optim_files:
                raise CheckpointError(
                    f"{self._optim_name(0, optim_files)}: missing (rank 0's optimizer partition)"
                )
            osd = load_pt(optim_files[0])
            try:
                o0 = osd[OPTIM]
                stage = int(o0["zero_stage"])
                pc = o0["partition_count"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{optim_files[0]}: not a ZeRO optimizer file (no zero_stage / partition_count)"
                ) from None
            world = max(pc) if isinstance(pc, list | tuple) else int(pc)
            if self.stage == -1:
                if stage not in (1, 2):
                    raise CheckpointError(
                        f"{optim_files[0]}: zero_stage {stage}, but the model states are laid out for ZeRO-1/2"
                    )
                self.stage = stage
            elif stage != 3:
                raise CheckpointError(
                    f"{optim_files[0]}: zero_stage {stage}, but the model states are laid out for ZeRO-3"
                )
            self.world_size = world
            for what, value in (
                ("mmt_meta.json world_size", meta_world),
                ("DeepSpeed dp_world_size", dp_world),
            ):
                if value is not None and int(value) != world:
                    raise CheckpointError(
                        f"{optim_files[0]}: partitioned over {world} ranks but {what} is {value}: "
                        "files from different saves are mixed in this folder"
                    )
            if meta_stage is not None and int(meta_stage) != self.stage:
                raise CheckpointError(
                    f"{optim_files[0]}: zero_stage {self.stage} but mmt_meta.json says {meta_stage}"
                )
            self.optim_files = self._complete(optim_files, world, "optimizer partition")
            self.model_files = (
                self._complete(model_files, world, "model states") if self.stage == 3 else [mp0]
            )
            self._zero_stage_prefix = optim_files[0].name.split("zero_pp_rank_")[0]
        self._check_partitions()

    def _optim_name(self, rank: int, files: dict[int, Path]) -> Path:
        prefix = "bf16_" if any(f.name.startswith("bf16_") for f in files.values()) else ""
        return self.dir / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

    def _complete(self, files: dict[int, Path], world: int, what: str) -> list[Path]:
        missing = [r for r in range(world) if r not in files]
        extra = sorted(r for r in files if r >= world)
        if missing:
            names = ", ".join(
                (
                    self._optim_name(r, files).name
                    if what.startswith("optim")
                    else f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                )
                for r in missing
            )
            raise CheckpointError(
                f"{self.dir}: incomplete checkpoint: {what} file(s) of rank(s) {missing} missing ({names}); "
                f"it was saved by {world} ranks"
            )
        if extra:
            raise CheckpointError(
                f"{files[extra[0]]}: rank {extra[0]} file in a checkpoint saved by {world} ranks: "
                "files from different saves are mixed in this folder"
            )
        return [files[r] for r in range(world)]

    # ---------------------------------------------------------------- the tensor map
    def _build_entries(self) -> None:
        ms = self.model_state
        module: dict[str, torch.Tensor] = ms["module"]
        buffer_names = set(ms.get("buffer_names") or [])
        shared = dict(ms.get("shared_params") or {})
        entries: dict[str, Entry] = {}
        if self.stage == 0:
            self._build_stage0(module, buffer_names, entries)
        else:
            shapes_by_group = [dict(g) for g in ms["param_shapes"]]
            frozen = dict(ms.get("frozen_param_shapes") or {})
            for name, shape in frozen.items():
                entries[name] = Entry(name, tuple(shape), torch.float32, "frozen")
            if self.stage == 3:
                off = 0
                for shapes in shapes_by_group:
                    for name, shape in shapes.items():
                        entries[name] = Entry(name, tuple(shape), torch.float32, "param", 0, off)
                        off += _partition_numel(math.prod(shape), self.world_size)
                self._param_span = off
            else:
                paddings = self._alignment_paddings()
                for g, shapes in enumerate(shapes_by_group):
                    off = 0
                    for i, (name, shape) in enumerate(shapes.items()):
                        entries[name] = Entry(name, tuple(shape), torch.float32, "param", g, off)
                        off += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
                    self._check_group_span(g, off)
        for name in buffer_names:
            if name in module:
                t = module[name]  # float buffers come out in fp32, as DeepSpeed's zero_to_fp32 gives them
                dt = torch.float32 if t.is_floating_point() else t.dtype
                entries[name] = Entry(name, tuple(t.shape), dt, "buffer")
        for name, src in shared.items():
            if src in entries:
                e = entries[src]
                entries[name] = Entry(name, e.shape, e.dtype, "shared", source=src)
        # output order: the model's own state-dict order, then anything the module dict does not list
        order = [k for k in module if k in entries] + [k for k in entries if k not in module]
        self.entries: dict[str, Entry] = {k: entries[k] for k in order}
        missing = [k for k in module if k not in entries]
        if missing:
            raise CheckpointError(f"{self.model_file}: module keys with no stored values: {missing[:5]}")

    def _build_stage0(
        self, module: dict[str, torch.Tensor], buffers: set[str], entries: dict[str, Entry]
    ) -> None:
        params = [k for k in module if k not in buffers]
        fp32 = None
        opt = self.model_state.get("optimizer")
        if (
            isinstance(opt, dict)
            and opt.get("fp32_groups")
            and any(module[k].dtype != torch.float32 for k in params)
        ):
            flat = [t for g in opt["fp32_groups"] for t in g]
            ok = len(flat) == len(params) and all(
                tuple(t.shape) == tuple(module[k].shape) and torch.equal(t.to(module[k].dtype), module[k])
                for t, k in zip(flat, params)
            )
            if not ok:
                raise CheckpointError(
                    f"{self.model_file}: the fp32 master weights (optimizer.fp32_groups) do not line up with the "
                    "module's parameters; refusing to guess which is which"
                )
            fp32 = dict(zip(params, flat))
        elif any(module[k].dtype != torch.float32 for k in params):
            self.notes.append(
                "no fp32 master weights stored: values come from the module's low-precision copy"
            )
        self._stage0_fp32 = fp32
        for k in params:
            entries[k] = Entry(k, tuple(module[k].shape), torch.float32, "module")

    def _check_same_save(self) -> None:
        """ZeRO-3 keeps one model states file per rank: each must load and describe the same save as rank 0's."""
        if self.stage != 3:
            return
        ms0 = self.model_state
        want = {
            "global_steps": ms0.get("global_steps"),
            "dp_world_size": ms0.get("dp_world_size"),
            "param_shapes": [list(dict(g).items()) for g in ms0.get("param_shapes") or []],
        }
        for f in self.model_files[1:]:
            ms = load_pt(f)
            if not isinstance(ms, dict) or "module" not in ms:
                raise CheckpointError(f"{f}: not a DeepSpeed model states file (no 'module')")
            have = {
                "global_steps": ms.get("global_steps"),
                "dp_world_size": ms.get("dp_world_size"),
                "param_shapes": [list(dict(g).items()) for g in ms.get("param_shapes") or []],
            }
            for k in want:
                if have[k] != want[k]:
                    shown = (have[k], want[k]) if k != "param_shapes" else ("other shapes", "")
                    raise CheckpointError(
                        f"{f}: {k} {shown[0]}"
                        + (f", rank 0 has {shown[1]}" if shown[1] != "" else " than rank 0's")
                        + ": files from different saves are mixed in this folder"
                    )
            del ms

    def _alignment_paddings(self) -> list[list[int]] | None:
        return load_pt(self.optim_files[0])[OPTIM].get("param_alignment_paddings")

    def _check_partitions(self) -> None:
        """Every rank's flat partition holds exactly what the parameter shapes need (catches mixed saves)."""
        if self.stage == 0:
            self._lengths: list[list[int]] = []
            return
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        lengths: list[list[int]] = []
        steps: list[tuple[float, ...]] = []
        for f in self.optim_files:
            o = load_pt(f)[OPTIM]
            st = int(o.get("zero_stage", -1))
            if st != self.stage:
                raise CheckpointError(
                    f"{f}: zero_stage {st}, rank 0 has {self.stage}: files from different saves are mixed"
                )
            pc = o.get("partition_count")
            w = max(pc) if isinstance(pc, list | tuple) else pc
            if w != self.world_size:
                raise CheckpointError(
                    f"{f}: partitioned over {w} ranks, rank 0 over {self.world_size}: files from different saves"
                )
            if key not in o:
                raise CheckpointError(f"{f}: no {key}: not a ZeRO-{self.stage} optimizer file")
            lengths.append([int(t.numel()) for t in o[key]])
            steps.append(_optimizer_steps(o))
            del o
        if any(st != steps[0] for st in steps):
            r = next(r for r, st in enumerate(steps) if st != steps[0])
            raise CheckpointError(
                f"{self.optim_files[r]}: optimizer step {list(steps[r])[:1]}, rank 0's is {list(steps[0])[:1]}: "
                "files from different saves are mixed in this folder"
            )
        self._lengths = lengths
        self._flat_key = key

    def _check_group_span(self, g: int, consumed: int) -> None:
        avail = sum(lens[g] for lens in self._lengths) if g < len(self._lengths[0]) else -1
        align = 2 * self.world_size

        def up(x: int) -> int:
            return align * math.ceil(x / align)

        if avail < consumed or up(consumed) != up(avail):
            raise CheckpointError(
                f"{self.dir}: parameter group {g} needs {consumed} values but the ranks' partitions hold {avail} "
                f"(per rank {[lens[g] for lens in self._lengths]}); the optimizer files do not belong to "
                f"{self.model_file.name}"
            )

    def _check_stage3_span(self) -> None:
        for r, lens in enumerate(self._lengths):
            if sum(lens) < self._param_span or sum(lens) - self._param_span >= 2 * self.world_size + 64:
                raise CheckpointError(
                    f"{self.optim_files[r]}: holds {sum(lens)} values, the parameters in {self.model_file.name} need "
                    f"{self._param_span} per rank: this partition does not belong to this checkpoint"
                )

    # ---------------------------------------------------------------- facts
    @property
    def num_parameters(self) -> int:
        return sum(e.numel for e in self.entries.values() if e.kind in ("param", "frozen", "module"))

    @property
    def dtype(self) -> str:
        if self.meta and self.meta.get("dtype"):
            return str(self.meta["dtype"])
        if (self.ds_config.get("bf16") or {}).get("enabled"):
            return "bf16"
        if (self.ds_config.get("fp16") or {}).get("enabled"):
            return "fp16"
        return "fp32"

    @property
    def step(self) -> int | None:
        if self.meta and "step" in self.meta:
            return int(self.meta["step"])
        v = self.model_state.get("step", self.model_state.get("global_steps"))
        return None if v is None else int(v)

    @property
    def config(self) -> dict[str, Any] | None:
        return None if self.meta is None else self.meta.get("config")

    def bytes_per_rank(self) -> list[int]:
        """Bytes on disk of each rank's files (rank 0 also counts the shared model states file)."""
        out = [0] * max(1, self.world_size)
        for f in self.optim_files:
            out[int(_RANK_RE.match(f.name).group(1))] += f.stat().st_size  # type: ignore[union-attr]
        for f in self.model_files:
            m = _RANK_RE.match(f.name)
            out[int(m.group(1)) if m else 0] += f.stat().st_size
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    # ---------------------------------------------------------------- reading
    def load_into(self, model: torch.nn.Module, what: str = "the model") -> None:
        """Copy the checkpoint's fp32 weights into ``model`` in place, tensor by tensor (never a second full copy).

        Strict: the names and shapes of the model's state dict and of the checkpoint must be the same; otherwise
        `CheckpointError` naming this folder and ``what`` lists what differs. Values are cast to each model
        tensor's dtype; a tensor shared under two names is copied under both.
        """
        state = model.state_dict()
        missing = [k for k in state if k not in self.entries]
        unexpected = [k for k in self.entries if k not in state]
        shapes = [
            f"{k}: {e.shape} in the checkpoint, {tuple(state[k].shape)} in the model"
            for k, e in self.entries.items()
            if k in state and tuple(state[k].shape) != e.shape
        ]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{self.dir}: weights do not fit {what} (missing {missing[:5]}, unexpected {unexpected[:5]}"
                + (f", shape differs: {'; '.join(shapes[:5])}" if shapes else "")
                + ")"
            )
        with torch.no_grad():
            for name, t in self.iter_tensors():
                state[name].copy_(t)

    def iter_tensors(
        self, names: list[str] | None = None, *, pieces: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in checkpoint order: fp32 for parameters and float buffers.

        ``pieces=True`` yields ``(name, [1-D tensors])`` instead, whose concatenation is the flattened tensor: views
        straight into the mapped rank partitions, so a writer can copy them out without any intermediate copy.
        """
        wanted = list(self.entries) if names is None else names
        reader = _FlatReader(self.optim_files, getattr(self, "_flat_key", ""), self.read_budget)
        frozen_frags: dict[int, dict[str, torch.Tensor]] = {}
        cache: dict[str, torch.Tensor] = {}
        shared_sources = {e.source for e in self.entries.values() if e.kind == "shared"}
        try:
            for name in wanted:
                e = self.entries[name]
                if pieces:
                    src = self.entries[e.source] if e.kind == "shared" else e
                    yield name, self._read_pieces(src, reader, frozen_frags)  # type: ignore[misc]
                    continue
                if e.kind == "shared":
                    t = (
                        cache[e.source]
                        if e.source in cache
                        else self._read(self.entries[e.source], reader, frozen_frags)
                    )
                else:
                    t = self._read(e, reader, frozen_frags)
                if name in shared_sources:
                    cache[name] = t
                yield name, t
        finally:
            reader.release()

    def _read(
        self, e: Entry, reader: _FlatReader, frozen: dict[int, dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        module = self.model_state["module"]
        if e.kind == "buffer":
            return module[e.name].to(e.dtype, copy=True)
        if e.kind == "module":
            src = self._stage0_fp32[e.name] if self._stage0_fp32 is not None else module[e.name]
            return src.float().clone()
        if e.kind == "frozen":
            return self._read_frozen(e, frozen)
        if self.stage == 3:
            part = _partition_numel(e.numel, self.world_size)
            pieces = [self._read_rank_range(reader, r, e.offset, part) for r in range(self.world_size)]
            return torch.cat(pieces)[: e.numel].view(e.shape)
        # ZeRO-1/2: a range of the group's global vector, which is the ranks' partitions back to back
        pieces, start, need, base = [], e.offset, e.numel, 0
        for r in range(self.world_size):
            length = self._lengths[r][e.group]
            lo, hi = max(start, base), min(start + need, base + length)
            if lo < hi:
                pieces.append(reader.read(r, e.group, lo - base, hi - lo))
            base += length
        t = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if t.numel() != e.numel:
            raise CheckpointError(
                f"{self.dir}: {e.name}: only {t.numel()} of {e.numel} values in the partitions"
            )
        return t.view(e.shape)

    def _read_pieces(
        self, e: Entry, reader: _FlatReader, frozen: dict[int, dict[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Like `_read`, flattened into pieces that are views of the mapped partitions where possible."""
        if e.kind != "param":
            return [self._read(e, reader, frozen).reshape(-1)]
        out: list[torch.Tensor] = []
        if self.stage == 3:
            part = _partition_numel(e.numel, self.world_size)
            left = e.numel
            for r in range(self.world_size):
                take = min(part, left)
                if take > 0:
                    out += self._rank_range_pieces(reader, r, e.offset, take)
                left -= take
        else:
            start, need, base = e.offset, e.numel, 0
            for r in range(self.world_size):
                length = self._lengths[r][e.group]
                lo, hi = max(start, base), min(start + need, base + length)
                if lo < hi:
                    out.append(reader.read(r, e.group, lo - base, hi - lo, copy=False))
                base += length
        if sum(t.numel() for t in out) != e.numel:
            raise CheckpointError(f"{self.dir}: {e.name}: the partitions do not hold all {e.numel} values")
        return out

    def _rank_range_pieces(self, reader: _FlatReader, rank: int, start: int, n: int) -> list[torch.Tensor]:
        pieces, base = [], 0
        for g, length in enumerate(self._lengths[rank]):
            lo, hi = max(start, base), min(start + n, base + length)
            if lo < hi:
                pieces.append(reader.read(rank, g, lo - base, hi - lo, copy=False))
            base += length
        return pieces

    def _read_rank_range(self, reader: _FlatReader, rank: int, start: int, n: int) -> torch.Tensor:
        """``n`` values from ``start`` of a rank's flat vector (its sub-groups back to back)."""
        pieces, base = [], 0
        for g, length in enumerate(self._lengths[rank]):
            lo, hi = max(start, base), min(start + n, base + length)
            if lo < hi:
                pieces.append(reader.read(rank, g, lo - base, hi - lo))
            base += length
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _read_frozen(self, e: Entry, frozen: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
        if self.stage in (1, 2):
            return self.model_state["frozen_param_fragments"][e.name].float().clone().view(e.shape)
        frags = []
        for r in range(self.world_size):
            if r not in frozen:
                frozen[r] = load_pt(self.model_files[r]).get("frozen_param_fragments") or {}
            if e.name not in frozen[r]:
                raise CheckpointError(f"{self.model_files[r]}: no frozen fragment of {e.name}")
            frags.append(frozen[r][e.name].float())
        return torch.cat(frags)[: e.numel].clone().view(e.shape)
