"""mmt's record inside DeepSpeed's ``client_state``: one typed shape, written by the trainer under the key
``"mmt"``, read back on resume.

DeepSpeed writes ``client_state`` once for all ranks, so the per-rank parts (random states, loader positions) are
gathered from every rank before the save and picked per rank on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

CLIENT_KEY = "mmt"


@dataclass
class ClientState:
    step: int
    samples_seen: int
    rng_states: list[Any] = field(default_factory=list)  # one per saving rank
    loader_states: list[Any] = field(
        default_factory=list
    )  # one per saving rank (None: the loader keeps none)
    mlflow_run_id: str | None = None
    world_size: int = 0
    # [step, world size, hostnames] each time the run (re)started on another world size
    world_sizes: list[list[Any]] = field(default_factory=list)

    def to_client_state(self) -> dict[str, Any]:
        """What ``engine.save_checkpoint(client_state=...)`` gets (no copies: the states are pickled as they are)."""
        return {CLIENT_KEY: {f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_client_state(cls, client: dict[str, Any]) -> ClientState:
        """The record in what ``engine.load_checkpoint`` returned (step -1 and no states when it holds none:
        another program's checkpoint); unknown keys are ignored."""
        inner = raw_record(client)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in inner.items() if k in known and v is not None}
        values.setdefault("step", -1)
        values.setdefault("samples_seen", 0)
        return cls(**values)

    def rank_rng(self, rank: int) -> Any | None:
        """This rank's saved RNG state, or None when the saved run had fewer ranks (seed that rank afresh)."""
        return self.rng_states[rank] if rank < len(self.rng_states) else None

    def rank_loader(self, rank: int) -> Any | None:
        """The data-loader state for ``rank`` on the new world size.

        mmt's indexed loader saves the same world-size-independent position on every rank (epoch, samples consumed
        of the global order), so any saved entry serves any new rank; a rank beyond the saved ones gets rank 0's.
        """
        if not self.loader_states:
            return None
        return self.loader_states[rank] if rank < len(self.loader_states) else self.loader_states[0]


def raw_record(client: dict[str, Any]) -> dict[str, Any]:
    """mmt's part of a loaded ``client_state`` as a plain dict (empty when there is none)."""
    inner = client.get(CLIENT_KEY)
    return inner if isinstance(inner, dict) else {}
