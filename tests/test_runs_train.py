"""`mmt runs` over runs logged by `mmt train` itself: two tiny runs differing only in `model.attention.kind`,
logged once to the embedded sqlite store (`tracking.uri`) and once to a real `mlflow server`
(`MLFLOW_TRACKING_URI`). The expected numbers come from each run's own `metrics.jsonl`, not from MLflow."""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from mmt.tracking.runs_cli import main
from tests.fixtures_train import BIN, run, write_config, write_shards

pytestmark = pytest.mark.slow

KINDS = ("mha", "linear")
STEPS = 3


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_two_runs(tmp: Path, urls: str, val_urls: str, experiment: str, uri: str, via_env: bool) -> dict:
    """`mmt train` once per attention kind; returns {kind: (run_id, run_dir)}."""
    out = {}
    for kind in KINDS:
        run_dir = tmp / "runs" / f"{experiment}-{kind}"  # also the run name
        tracking = {"backend": "mlflow", "experiment": experiment, "flush_interval_s": 0.2}
        if not via_env:
            tracking["uri"] = uri
        cfg = write_config(
            tmp / f"{experiment}-{kind}.yaml",
            train_urls=urls,
            val_urls=val_urls,
            run_dir=run_dir,
            model={"attention": {"kind": kind}},
            train={"max_steps": STEPS, "zero_stage": 0, "checkpoint_at_end": True},
            tracking=tracking,
        )
        env = {"MLFLOW_TRACKING_URI": uri} if via_env else {}
        run([str(BIN / "mmt"), "train", str(cfg)], cwd=tmp, timeout=300, **env)
        final = json.loads((run_dir / "final_metrics.json").read_text())
        assert final["tracking_uri"] == uri, final  # what mmt demo prints as the store to browse
        out[kind] = (final["mlflow_run_id"], run_dir)
    return out


@pytest.fixture(scope="module")
def trained_all(mlflow_server, tmp_path_factory):
    """Both pairs of runs; the embedded-store pair and the server pair train at the same time (each run is a
    single process, so two use the 2 cores; sequential, start-up would dominate the wall time twice over)."""
    tmp = tmp_path_factory.mktemp("runs_train")
    urls = write_shards(tmp / "train", 16)
    val_urls = write_shards(tmp / "val", 8, seed=1)
    stores = {"embedded": (f"sqlite:///{tmp / 'mlflow.db'}", False), "server": (mlflow_server.uri, True)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(_train_two_runs, tmp, urls, val_urls, f"attn-{name}", uri, via_env)
            for name, (uri, via_env) in stores.items()
        }
        return {name: (stores[name][0], fut.result()) for name, fut in futures.items()}


@pytest.fixture(params=["embedded", "server"])
def trained(request, trained_all):
    uri, runs = trained_all[request.param]
    return uri, runs, f"attn-{request.param}"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_shows_trained_runs(trained, capsys):
    uri, runs, exp = trained
    rc, out, err = _cli(capsys, "list", "--experiment", exp, "--tracking-uri", uri)
    assert rc == 0, err
    header = out.splitlines()[0].split()
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {run_id for run_id, _ in runs.values()}
    for kind, (run_id, _) in runs.items():
        cells = rows[run_id]  # "started" is two tokens: later cells shift by one
        assert cells[1] == f"{exp}-{kind}" and cells[3] == "FINISHED"
        assert cells[header.index("steps") + 1] == str(STEPS)


def test_compare_trained_runs(trained, capsys, tmp_path):
    uri, runs, exp = trained
    ids = [runs[k][0] for k in KINDS]
    out_json, png = tmp_path / "t.json", tmp_path / "t.png"
    rc, out, err = _cli(
        capsys, "compare", *ids, "--tracking-uri", uri, "--json", str(out_json), "--plot", str(png)
    )
    assert rc == 0, err
    data = json.loads(out_json.read_text())
    assert "model.attention.kind" in data["differing_params"]
    assert not any(p.startswith(("model.dim", "model.depth", "train.seed")) for p in data["differing_params"])
    assert data["metrics"][:3] == ["train/loss", "val/loss", "val/recall_at_1"]
    recs = {r["run_id"]: r for r in data["runs"]}
    for kind, (run_id, run_dir) in runs.items():
        rec = recs[run_id]
        rows = _jsonl(run_dir)
        train_rows = [r for r in rows if "train/loss" in r]
        val_row = [r for r in rows if "val/recall_at_1" in r][-1]
        assert rec["params.model.attention.kind"] == kind
        assert rec["train/loss.final"] == pytest.approx(train_rows[-1]["train/loss"], rel=1e-6)
        assert rec["train/loss.final_step"] == STEPS
        assert rec["train/loss.best"] == pytest.approx(min(r["train/loss"] for r in train_rows), rel=1e-6)
        assert rec["val/recall_at_1.final"] == pytest.approx(val_row["val/recall_at_1"], rel=1e-6)
        sps = statistics.median(r["train/samples_per_s"] for r in train_rows)
        assert rec["train/samples_per_s.median"] == pytest.approx(sps, rel=1e-6)
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.size == (1000, 320 * len(data["metrics"]))

    rc, _, err = _cli(
        capsys,
        "compare",
        "--experiment",
        exp,
        "--filter",
        "params.model.attention.kind = 'linear'",
        "--tracking-uri",
        uri,
        "--json",
        str(out_json),
    )
    assert rc == 0, err
    assert [r["run_id"] for r in json.loads(out_json.read_text())["runs"]] == [runs["linear"][0]]


def test_best_trained_run_points_at_its_checkpoint(trained, capsys):
    uri, runs, exp = trained
    rc, out, err = _cli(
        capsys, "best", "--experiment", exp, "--metric", "val/recall_at_1", "--tracking-uri", uri, "--json"
    )
    assert rc == 0, err
    res = json.loads(out)
    recall = {
        run_id: [r for r in _jsonl(run_dir) if "val/recall_at_1" in r][-1]["val/recall_at_1"]
        for run_id, run_dir in runs.values()
    }
    assert res["value"] == pytest.approx(max(recall.values()), rel=1e-6)
    assert recall[res["run_id"]] == pytest.approx(res["value"], rel=1e-6)
    run_dir = next(d for rid, d in runs.values() if rid == res["run_id"])
    assert Path(res["checkpoint_dir"]) == run_dir / "checkpoints"
    assert Path(res["latest_checkpoint"]) == run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (Path(res["latest_checkpoint"]) / "mmt_meta.json").is_file()
