"""Every `mmt` subcommand on bad input: a missing file, a bad key or value, corrupt input. Each must exit with
code 2 and print exactly one line on stderr that names the culprit (no traceback, no usage block), before any
data is built, any rank is launched or any output is written. Run in-process through `mmt.cli.main`."""

from __future__ import annotations

import json

import pytest

from mmt.cli import main
from mmt.config.named import CONFIG_DIR

DEMO = str(CONFIG_DIR / "train" / "demo.yaml")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Bad inputs of every kind, made once."""
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.yaml").write_text("model: {dim: [1, 2\n")
    (d / "corrupt.json").write_text('{"samples": [1,')
    (d / "not_a_tar.tar").write_bytes(b"this is not a tar archive\n" * 3)
    (d / "a_file").write_text("x")
    (d / "not_a_db.db").write_bytes(b"not sqlite" * 10)
    ckpt = d / "run" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000002")
    (ckpt / "step_00000002" / "mmt_meta.json").write_text("{truncated")
    (d / "demo_data").mkdir()
    (d / "demo_data" / "demo.json").write_text(json.dumps({"train_urls": 3}))
    return d


def _cases():
    # (id, argv with {d} for the folder of bad inputs, what the line must name)
    return [
        ("train-missing-file", ["train", "{d}/missing.yaml"], "missing.yaml"),
        ("train-bad-key", ["train", DEMO, "model.nope=1"], "model.nope"),
        ("train-bad-value", ["train", DEMO, "train.max_steps=many"], "train.max_steps"),
        ("train-corrupt-config", ["train", "{d}/corrupt.yaml"], "corrupt.yaml"),
        (
            "train-all-shards-missing",
            [
                "train",
                DEMO,
                "data.train_urls={d}/missing-{000000..000001}.tar",
                "train.max_steps=1",
                "tracking.backend=none",
                "train.run_dir={d}/run_no_shards",
            ],
            "{d}/missing-000000.tar: shard not found",
        ),
        ("train-unparsable-override", ["train", DEMO, "train.max_steps=[1"], "train.max_steps"),
        ("eval-missing-config", ["eval", "{d}/missing.yaml", "--checkpoint", "{d}/run"], "missing.yaml"),
        ("eval-missing-checkpoint", ["eval", DEMO, "--checkpoint", "{d}/no_run"], "no_run"),
        ("eval-bad-key", ["eval", DEMO, "model.nope=1", "--checkpoint", "{d}/run"], "model.nope"),
        ("eval-corrupt-checkpoint", ["eval", DEMO, "--checkpoint", "{d}/run"], "{d}/run"),
        ("eval-corrupt-config", ["eval", "{d}/corrupt.yaml", "--checkpoint", "{d}/run"], "corrupt.yaml"),
        ("demo-missing-config", ["demo", "--config", "{d}/missing.yaml"], "missing.yaml"),
        ("demo-bad-key", ["demo", "--data", "{d}/demo_data", "nope=1"], "nope"),
        ("demo-bad-value", ["demo", "--nproc", "0"], "--nproc"),
        ("demo-data-is-a-file", ["demo", "--data", "{d}/a_file"], "a_file"),
        ("demo-corrupt-config", ["demo", "--config", "{d}/corrupt.yaml"], "corrupt.yaml"),
        ("demo-corrupt-dataset", ["demo", "--data", "{d}/demo_data"], "demo.json"),
        ("shards-build-missing", ["shards", "build", "{d}/missing.jsonl", "{d}/out1"], "missing.jsonl"),
        (
            "shards-build-bad-value",
            ["shards", "build", "{d}/corrupt.json", "{d}/o", "--max-shard-bytes", "lots"],
            "lots",
        ),
        ("shards-build-corrupt", ["shards", "build", "{d}/corrupt.json", "{d}/out2"], "corrupt.json"),
        ("shards-stats-missing", ["shards", "stats", "{d}/missing.tar"], "missing.tar"),
        (
            "shards-stats-bad-value",
            ["shards", "stats", "{d}/missing.tar", "--max-samples", "all"],
            "--max-samples",
        ),
        ("shards-stats-corrupt", ["shards", "stats", "{d}/not_a_tar.tar"], "not_a_tar.tar"),
        ("shards-index-missing", ["shards", "index", "{d}/missing.tar"], "missing.tar"),
        ("shards-index-no-match", ["shards", "index", ""], "''"),
        ("shards-index-corrupt", ["shards", "index", "{d}/not_a_tar.tar"], "not_a_tar.tar"),
        ("shards-demo-out-is-a-file", ["shards", "demo", "{d}/a_file"], "a_file"),
        (
            "shards-demo-bad-value",
            ["shards", "demo", "{d}/demo_out", "--val-fraction", "3"],
            "--val-fraction",
        ),
        ("slurm-submit-missing", ["slurm", "submit", "{d}/missing.yaml", "--dry-run"], "missing.yaml"),
        ("slurm-submit-bad-key", ["slurm", "submit", DEMO, "nope=1", "--dry-run"], "nope"),
        ("slurm-submit-bad-value", ["slurm", "submit", DEMO, "--nodes", "x", "--dry-run"], "--nodes"),
        ("slurm-submit-corrupt", ["slurm", "submit", "{d}/corrupt.yaml", "--dry-run"], "corrupt.yaml"),
        ("slurm-wait-bad-job-id", ["slurm", "wait", "12;rm"], "'12;rm'"),
        ("slurm-wait-bad-timeout", ["slurm", "wait", "123", "--timeout", "-1"], "--timeout"),
        (
            "ckpt-check-resume-missing",
            ["ckpt", "check-resume", "{d}/no_run", "--world-size", "2", "--zero-stage", "2"],
            "no_run",
        ),
        (
            "ckpt-check-resume-bad-world",
            ["ckpt", "check-resume", "{d}/run", "--world-size", "0", "--zero-stage", "2"],
            "--world-size",
        ),
        (
            "ckpt-check-resume-bad-stage",
            ["ckpt", "check-resume", "{d}/run", "--world-size", "2", "--zero-stage", "4"],
            "--zero-stage",
        ),
        (
            "ckpt-check-resume-corrupt",
            ["ckpt", "check-resume", "{d}/run", "--world-size", "2", "--zero-stage", "2"],
            "mmt_meta.json",
        ),
        ("model-missing", ["model", "{d}/missing.yaml"], "missing.yaml"),
        ("model-bad-key", ["model", "tiny_tri", "nope=1"], "nope"),
        ("model-bad-value", ["model", "tiny_tri", "attention.kind=fancy"], "attention.kind"),
        ("model-corrupt", ["model", "{d}/corrupt.json"], "corrupt.json"),
        ("runs-missing-store", ["runs", "list", "--tracking-uri", "sqlite:///{d}/missing.db"], "missing.db"),
        (
            "runs-bad-value",
            ["runs", "best", "--experiment", "e", "--metric", "m", "--mode", "sideways"],
            "--mode",
        ),
        (
            "runs-corrupt-store",
            ["runs", "list", "--tracking-uri", "sqlite:///{d}/not_a_db.db"],
            "not_a_db.db",
        ),
    ]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv,culprit", [pytest.param(a, c, id=i) for i, a, c in _cases()])
def test_bad_input_is_one_line_and_exit_code_2(bad, capsys, argv, culprit):
    argv = [a.replace("{d}", str(bad)) for a in argv]
    rc, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert culprit.replace("{d}", str(bad)) in lines[0], lines[0]
    assert "Traceback" not in err and "usage:" not in err


def test_nothing_is_written_for_bad_input(bad, capsys):
    """The failed commands above left no outputs: no index sidecar for the corrupt tar, no demo dataset."""
    for argv in (
        ["shards", "index", f"{bad}/not_a_tar.tar"],
        ["shards", "demo", f"{bad}/demo_out", "--val-fraction", "3"],
    ):
        assert _run(argv, capsys)[0] == 2
    assert not (bad / "not_a_tar.tar.idx.json").exists()
    assert not (bad / "demo_out").exists()


def test_slurm_wait_without_slurm_names_the_missing_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    rc, _, err = _run(["slurm", "wait", "123", "--timeout", "1"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "scontrol" in err, err


def test_the_dispatcher_knows_every_listed_error_class():
    """A moved or renamed error class would silently become a traceback again: each entry must resolve."""
    import importlib

    from mmt.clirun import ERRORS

    for module, cls, _ in ERRORS:
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), (module, cls)
