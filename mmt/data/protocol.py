"""What the trainer needs from a training loader, as a type both sides see.

It lives in the data layer (below training) so that the loaders can be checked against it and the trainer can
use it without an import pointing upwards. `IndexedLoader` (exact resume on any world size) and
`StreamingLoader` (webdataset-style streams) both satisfy it; so may a test's own loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TrainLoader(Protocol):
    """One rank's training batches, with the position a checkpoint saves and a resume restores.

    ``for batch in loader`` yields the rest of the current epoch and then moves to the next one, so the trainer
    iterates again for every epoch. The state is plain data; loading it continues the same sample sequence.
    """

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (logged as ``train/epoch``)."""
        ...

    @property
    def num_samples(self) -> int | None:
        """Samples one epoch visits, or None when the loader cannot know (a stream): ``train.epochs`` needs it."""
        ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch``'s start, unless it is the current epoch (a resumed position is kept)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, samples or batches consumed) and the failure counts, for the checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position; a state that would not continue exactly raises `DataError`."""
        ...

    def stats(self) -> dict[str, Any]:
        """Fault counts: ``samples_read``, ``samples_failed`` (and ``shards_failed`` where shards are indexed)."""
        ...

    def io_stats(self) -> dict[str, float] | None:
        """This rank's I/O since the loader was built (bytes and shards fetched, cache hits, download wait in
        ``wait_s``), or None when the loader does not count it; logged per node as ``node<k>/data_*``."""
        ...

    def close(self) -> None:
        """Release what an unfinished epoch holds (read-ahead threads); called once when the run ends."""
        ...


@runtime_checkable
class EvalLoader(Protocol):
    """One rank's evaluation batches: every pass starts at the first sample; `close` once done."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def close(self) -> None: ...
