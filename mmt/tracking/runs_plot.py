"""`mmt runs compare --plot`: every run's metric curves on shared axes, one panel per metric.

Drawn with matplotlib's Agg backend (no display needed) at an exact pixel size, and written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from mmt.atomic import atomic_write_bytes
from mmt.tracking.runs import MetricPoint, RunsError
from mmt.tracking.runs_compare import Comparison

DPI = 100
DEFAULT_WIDTH = 1000
PANEL_HEIGHT = 320  # default pixels per metric panel


def default_size(n_metrics: int) -> tuple[int, int]:
    """Default (width, height) in pixels: a fixed width and one panel height per metric."""
    return DEFAULT_WIDTH, PANEL_HEIGHT * max(1, n_metrics)


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' in pixels, e.g. '1200x800'."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise RunsError(
            f"invalid --plot-size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1200x800"
        ) from None
    if not (64 <= w <= 10000 and 64 <= h <= 10000):
        raise RunsError(f"invalid --plot-size {text!r}: width and height must be between 64 and 10000 pixels")
    return w, h


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's smoothing so early points are not pulled to 0.

    weight 0 returns the values unchanged; 0.9 averages over roughly the last 10 points.
    """
    if not 0.0 <= weight < 1.0:
        raise RunsError(f"invalid --smooth {weight}: expected a weight in [0, 1)")
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * v
        out.append(acc / (1.0 - weight**i) if weight > 0 else v)
    return out


def _x_values(points: Sequence[MetricPoint], x: str, start_ms: int | None) -> list[float]:
    if x == "step":
        return [float(p.step) for p in points]
    origin = start_ms if start_ms is not None else points[0].timestamp_ms
    return [(p.timestamp_ms - origin) / 1000.0 for p in points]


def plot_comparison(
    comp: Comparison,
    out: str | os.PathLike,
    start_ms: dict[str, int | None],
    x: str = "step",
    smooth: float = 0.0,
    size: tuple[int, int] | None = None,
) -> Path:
    """Draw the chosen metrics of every run to a PNG at `out`; `start_ms` maps run id -> run start time.

    With smoothing the raw curve stays visible, faint, behind the smoothed one.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not 0.0 <= smooth < 1.0:
        raise RunsError(f"invalid --smooth {smooth}: expected an EMA weight in [0, 1)")
    if x not in ("step", "time"):
        raise RunsError(f"invalid --x {x!r}: expected 'step' or 'time'")
    if not comp.metrics:
        raise RunsError("nothing to plot: none of the runs logged the chosen metrics")
    width, height = size or default_size(len(comp.metrics))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = fig.subplots(len(comp.metrics), 1, sharex=True, squeeze=False)[:, 0]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, comp.metrics):
        for i, row in enumerate(comp.rows):
            points = comp.histories[row.run_id].get(key, [])
            if not points:
                continue
            xs = _x_values(points, x, start_ms.get(row.run_id))
            ys = [p.value for p in points]
            color = colors[i % len(colors)]
            marker = "o" if len(points) <= 20 else None  # sparse curves (eval metrics) stay visible
            label = f"{row.run_name} ({row.run_id[:8]})"
            if smooth > 0:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
                ax.plot(
                    xs, ema(ys, smooth), color=color, label=label, linewidth=1.5, marker=marker, markersize=3
                )
            else:
                ax.plot(xs, ys, color=color, label=label, linewidth=1.5, marker=marker, markersize=3)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step" if x == "step" else "wall-clock time since run start (s)")
    title = "run comparison" + (f" (EMA smoothing {smooth:g})" if smooth > 0 else "")
    axes[0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": keep the exact pixel size
    return atomic_write_bytes(out, buf.getvalue())
