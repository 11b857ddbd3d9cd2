"""`mmt.ds_compat`: every DeepSpeed work-around has a canary that still finds its bug in the installed DeepSpeed,
and a DeepSpeed outside the tested series is refused in one line unless overridden.

A failing canary after a DeepSpeed upgrade is good news: the message names the work-around to delete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmt.config import ConfigError
from mmt.ds_compat import ALLOW_UNTESTED_ENV, TESTED_SERIES, WORKAROUNDS, check_version
from tests.ds_canaries import CANARIES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def canaries(tmp_path_factory) -> dict[str, dict]:
    """The canaries' verdicts, from one fresh process (nothing patched there)."""
    out = tmp_path_factory.mktemp("canaries") / "canaries.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ds_canaries", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_workaround_has_a_canary():
    assert set(CANARIES) == set(WORKAROUNDS)


@pytest.mark.parametrize("name", sorted(WORKAROUNDS))
def test_installed_deepspeed_still_needs_the_workaround(canaries, name):
    import deepspeed

    w = WORKAROUNDS[name]
    got = canaries[name]
    assert got["present"], (
        f"DeepSpeed {deepspeed.__version__} no longer shows the behaviour work-around {name!r} exists for "
        f"({w.upstream}; canary saw: {got['detail']}): drop it from mmt/ds_compat.py (it patches {w.patches})"
    )


def test_cpu_grad_buffer_reuse_is_bit_identical(canaries):
    """`reuse_cpu_grad_buffers` (ZeRO-1 and ZeRO-2, gradient accumulation, bucket smaller than a parameter) gives
    bitwise DeepSpeed's own losses, gradient norms and weights, and does reuse its buffers (run in the canaries'
    process, after them; see `tests.ds_canaries.reuse_check`)."""
    got = canaries["reuse_check"]
    for stage in (1, 2):
        for check in ("losses_equal", "norms_equal", "weights_equal", "weights_moved", "buffers_reused"):
            assert got[f"zero{stage}_{check}"], (check, got[f"zero{stage}_detail"])


def test_untested_deepspeed_is_refused_unless_allowed(monkeypatch):
    tested = ".".join(map(str, TESTED_SERIES))
    check_version(f"{tested}.8")  # the tested series passes
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        check_version("0.21.0")
    assert str(e.value).startswith(f"deepspeed 0.21.0: {ALLOW_UNTESTED_ENV}: ")
    assert f"tested on DeepSpeed {tested}.x only" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_version("0.21.0")
