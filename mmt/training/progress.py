"""The console progress bar of a run: tqdm with ETA on rank 0 when ``train.progress_bar`` is set, else nothing."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm


class ProgressBar:
    """One tick per optimizer step and the last logged loss beside it; a no-op where it is not shown, so the
    loop calls it unconditionally."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
            if enabled
            else None
        )

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show_loss(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.close()
