"""Resume on another world size through `mmt ckpt to-universal`: weights, optimizer and step counter carry over.

Every step's global batch is the same on any world size (`tests.ckpt_harness`), so the resumed run's losses must
continue the saved run's trajectory. Tolerance: the gradient all-reduce sums the ranks' partial gradients in a
different order on 1 and 2 ranks, so fp32 results agree to rounding (~1e-7 relative), not bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from mmt.ckpt.cli import main as ckpt_main
from mmt.ckpt.inspect import inspect_checkpoint
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.resume import check_resumable
from tests.fixtures_ckpt import SAVE_STEP, STEPS, TINY, live_params, read_losses, run_harness

pytestmark = pytest.mark.dist
TAG = f"step_{SAVE_STEP:08d}"


def assert_continues(reference: dict[int, dict], resumed: dict[int, dict], world_size: int) -> None:
    assert sorted(resumed) == list(range(SAVE_STEP + 1, STEPS + 1))  # the step counter continued
    for step, rec in resumed.items():
        assert rec["world_size"] == world_size and rec["engine_step"] == step
        assert rec["lr"] == pytest.approx(reference[step]["lr"], rel=1e-12)  # the LR schedule continued
        torch.testing.assert_close(rec["loss"], reference[step]["loss"], rtol=1e-5, atol=1e-6)


def test_zero2_saved_on_2_resumes_on_1(zero_run, tmp_path):
    src = zero_run(2)
    uni = tmp_path / "universal"
    assert ckpt_main(["to-universal", str(src), str(uni)]) == 0
    info = inspect_checkpoint(uni)
    assert info["universal"] is True and info["complete"] is True and info["step"] == SAVE_STEP
    assert json.loads((uni / "checkpoints" / TAG / "mmt_meta.json").read_text())["source_world_size"] == 2
    plan = check_resumable(uni, world_size=1, zero_stage=2)
    assert plan.load_universal and plan.saved_world_size == 2
    with pytest.raises(CheckpointError, match="universal checkpoint from ZeRO-2 loads into ZeRO-1/2"):
        check_resumable(uni, world_size=1, zero_stage=3)
    assert (
        ckpt_main(["to-universal", str(src), str(uni)]) == 2
    )  # an existing output is never overwritten silently
    resumed = tmp_path / "resumed"
    run_harness(
        resumed,
        1,
        "--model",
        str(TINY),
        "--zero-stage",
        "2",
        "--steps",
        str(STEPS),
        "--resume-from",
        str(uni),
    )
    assert_continues(read_losses(src), read_losses(resumed), world_size=1)


def test_zero2_saved_on_1_resumes_on_2(tmp_path):
    src = tmp_path / "one"
    run_harness(
        src, 1, "--model", str(TINY), "--zero-stage", "2", "--steps", str(STEPS), "--save-at", str(SAVE_STEP)
    )
    with pytest.raises(CheckpointError, match="saved by 1 ranks with ZeRO-2, this run has 2"):
        check_resumable(src, world_size=2, zero_stage=2)
    uni = tmp_path / "universal"
    assert ckpt_main(["reshard", str(src), str(uni)]) == 0
    resumed = tmp_path / "resumed"
    run_harness(
        resumed,
        2,
        "--model",
        str(TINY),
        "--zero-stage",
        "2",
        "--steps",
        str(STEPS),
        "--resume-from",
        str(uni),
    )
    assert_continues(read_losses(src), read_losses(resumed), world_size=2)


def test_zero3_saved_on_2_loads_exact_weights_on_1(zero_run, tmp_path):
    src = zero_run(3)
    uni = tmp_path / "universal"
    assert ckpt_main(["to-universal", str(src), str(uni)]) == 0
    resumed = tmp_path / "resumed"
    run_harness(
        resumed,
        1,
        "--model",
        str(TINY),
        "--zero-stage",
        "3",
        "--steps",
        str(STEPS),
        "--resume-from",
        str(uni),
        "--dump-live",
    )
    saved, loaded = live_params(src), live_params(resumed, f"resumed_{TAG}")
    assert set(saved) == set(loaded)
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k  # exactly the saved weights, not merely close
    assert_continues(read_losses(src), read_losses(resumed), world_size=1)
