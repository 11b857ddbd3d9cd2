"""`mmt runs` against a real `mlflow server` and against the embedded sqlite store.

Most runs are logged here with MlflowClient following `mmt train`'s conventions (dotted params, `train/*` and
`val/*` metrics, `mmt.*` tags), with hand-picked values so every number in the table is known. The experiments
`plain` and `wide` hold runs logged by plain `mlflow` calls, as any other program logs them (param `lr`,
metrics `loss` and `acc`; one run with many metrics), which `mmt runs` must handle just as well.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image

from mmt.tracking.runs_cli import main

T0 = 1_790_000_000_000  # fixed run start (ms since epoch) so wall-clock x values are known
STEPS = 10
VAL_STEPS = (4, 9)


@dataclass
class LoggedRun:
    run_id: str
    name: str
    kind: str
    loss: list[float]
    recall: list[float]  # val/recall_at_1 at VAL_STEPS
    samples_per_s: list[float]
    mfu: list[float]
    checkpoint_dir: Path


def _log_run(
    client: MlflowClient, exp_id: str, name: str, kind: str, slope: float, recall, root: Path, start_ms: int
):
    params = {
        "model.attention.kind": kind,
        "model.dim": "64",
        "train.seed": "0",
        "tracking.run_name": name,
    }
    run_dir = root / name
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text(f"step_{STEPS - 1:08d}\n")
    run = client.create_run(exp_id, start_time=start_ms, run_name=name)
    rid = run.info.run_id
    # the loss rises once at step 7 so its best (minimum, step 6) differs from its final value
    loss = [2.0 - slope * s + (4 * slope if s >= 7 else 0.0) for s in range(STEPS)]
    sps = [5.0] + [100.0 + 2 * s for s in range(1, STEPS)]  # slow first step: median ignores it
    mfu = [0.01] + [0.2 + 0.01 * s for s in range(1, STEPS)]
    metrics = []
    for s in range(STEPS):
        ts = start_ms + 1000 * (s + 1)
        metrics += [
            Metric("train/loss", loss[s], ts, s),
            Metric("train/samples_per_s", sps[s], ts, s),
            Metric("train/mfu", mfu[s], ts, s),
            Metric("train/lr", 1e-3, ts, s),
        ]
    for s, r in zip(VAL_STEPS, recall):
        metrics.append(Metric("val/recall_at_1", r, start_ms + 1000 * (s + 1) + 500, s))
    tags = [RunTag("mmt.run_dir", str(run_dir)), RunTag("mmt.checkpoint_dir", str(ckpt))]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()], tags=tags)
    client.set_terminated(rid, end_time=start_ms + 1000 * (STEPS + 2))
    return LoggedRun(rid, name, kind, loss, list(recall), sps, mfu, ckpt)


@dataclass
class PlainRun:
    run_id: str
    lr: float
    loss: list[float]
    acc: list[float]


def _log_plain_runs(uri: str) -> tuple[list[PlainRun], str]:
    """Two runs in experiment `plain` and one with 11 metrics in `wide`, through mlflow's fluent API only."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("plain")
        plain = []
        for lr, rate in ((0.1, 0.3), (0.01, 0.1)):
            with mlflow.start_run() as run:
                mlflow.log_param("lr", lr)
                loss = [1.0 / (1 + rate * s) for s in range(6)]
                acc = [0.5 + rate * s / 2 for s in range(6)]
                for s in range(6):
                    mlflow.log_metrics({"loss": loss[s], "acc": acc[s]}, step=s)
            plain.append(PlainRun(run.info.run_id, lr, loss, acc))
        mlflow.set_experiment("wide")
        with mlflow.start_run() as run:
            mlflow.log_metrics({f"m{i:02d}": float(i) for i in range(11)}, step=0)
        return plain, run.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)


@dataclass
class Store:
    uri: str
    softmax: LoggedRun
    linear: LoggedRun
    other: LoggedRun  # in another experiment
    plain: list[PlainRun]  # plain mlflow runs, newest last
    wide: str  # a plain run with 11 metrics


@pytest.fixture(scope="module", params=["embedded", "server"])
def store(request, tmp_path_factory) -> Store:
    if request.param == "server":
        uri = request.getfixturevalue("mlflow_server").uri
    else:
        uri = f"sqlite:///{tmp_path_factory.mktemp('embedded') / 'mlflow.db'}"
    root = tmp_path_factory.mktemp(f"runs_{request.param}")
    client = MlflowClient(uri)
    cmp_id = client.create_experiment("cmp")
    other_id = client.create_experiment("other")
    softmax = _log_run(client, cmp_id, "softmax", "softmax", 0.1, (0.30, 0.25), root, T0)
    linear = _log_run(client, cmp_id, "linear", "linear", 0.05, (0.20, 0.40), root, T0 + 60_000)
    other = _log_run(client, other_id, "other", "softmax", 0.1, (0.1, 0.1), root, T0 + 120_000)
    plain, wide = _log_plain_runs(uri)
    return Store(uri, softmax, linear, other, plain, wide)


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_shows_runs_with_status_steps_and_metrics(store, capsys):
    rc, out, _ = _run_cli(capsys, "list", "--tracking-uri", store.uri)
    assert rc == 0
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:7] == ["run_id", "name", "experiment", "status", "started", "duration", "steps"]
    assert "train/loss" in header and "val/recall_at_1" in header
    body = lines[2:]
    assert [line.split()[0] for line in body] == [
        store.wide,
        *(r.run_id for r in reversed(store.plain)),
        store.other.run_id,
        store.linear.run_id,
        store.softmax.run_id,
    ]
    body = body[3:]
    cells = body[1].split()  # the "started" cell is two tokens (date time): later cells shift by one
    assert cells[1:4] == ["linear", "cmp", "FINISHED"]
    assert cells[6] == "12.0s"  # duration: end - start
    assert cells[7] == str(STEPS - 1)  # steps
    assert cells[header.index("train/loss") + 1] == f"{store.linear.loss[-1]:.4g}"
    assert cells[header.index("val/recall_at_1") + 1] == f"{store.linear.recall[-1]:.4g}"

    rc, out, _ = _run_cli(capsys, "list", "--tracking-uri", store.uri, "--experiment", "cmp", "--limit", "1")
    assert rc == 0
    assert store.linear.run_id in out and store.softmax.run_id not in out and store.other.run_id not in out


def test_compare_table_and_exports(store, capsys, tmp_path):
    ids = [store.softmax.run_id, store.linear.run_id]
    out_csv, out_json = tmp_path / "t.csv", tmp_path / "t.json"
    rc, out, err = _run_cli(
        capsys, "compare", *ids, "--tracking-uri", store.uri, "--csv", str(out_csv), "--json", str(out_json)
    )
    assert rc == 0, err
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "params.model.attention.kind" in rows
    assert rows["params.model.attention.kind"].split()[1:] == ["softmax", "linear"]
    assert not any("model.dim" in key or "train.seed" in key for key in rows)  # equal params are not shown
    assert "train/loss final" in rows and "val/recall_at_1 best (max)" in rows and "train/mfu median" in rows

    data = json.loads(out_json.read_text())
    assert data["differing_params"] == ["model.attention.kind", "tracking.run_name"]
    assert data["metrics"] == ["train/loss", "val/recall_at_1"]
    recs = {r["run_id"]: r for r in data["runs"]}
    for logged in (store.softmax, store.linear):
        rec = recs[logged.run_id]
        assert rec["run_name"] == logged.name and rec["status"] == "FINISHED"
        assert rec["params.model.attention.kind"] == logged.kind
        assert rec["train/loss.final"] == pytest.approx(logged.loss[-1])
        assert rec["train/loss.final_step"] == STEPS - 1
        assert rec["train/loss.best"] == pytest.approx(min(logged.loss))
        assert rec["train/loss.best_step"] == logged.loss.index(min(logged.loss))
        assert rec["val/recall_at_1.final"] == pytest.approx(logged.recall[-1])
        assert rec["val/recall_at_1.best"] == pytest.approx(max(logged.recall))
        assert rec["val/recall_at_1.best_step"] == VAL_STEPS[logged.recall.index(max(logged.recall))]
        # median over steps (5, 102, 104, ..., 118): (108 + 110) / 2; the slow first step does not drag it down
        assert rec["train/samples_per_s.median"] == pytest.approx(109.0)
        assert rec["train/mfu.median"] == pytest.approx((0.24 + 0.25) / 2)
    assert recs[store.softmax.run_id]["train/loss.best_step"] == 6

    with out_csv.open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["run_id"] for r in csv_rows] == ids
    for csv_row in csv_rows:
        rec = recs[csv_row["run_id"]]
        assert set(csv_row) == set(rec)
        for key, value in rec.items():
            if isinstance(value, float):
                assert float(csv_row[key]) == pytest.approx(value), key
            else:
                assert csv_row[key] == str(value), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.json"]  # no temp files left behind


def test_compare_experiment_with_filter(store, capsys, tmp_path):
    out_json = tmp_path / "f.json"
    rc, _, err = _run_cli(
        capsys,
        "compare",
        "--experiment",
        "cmp",
        "--filter",
        "params.model.attention.kind = 'linear'",
        "--metrics",
        "train/loss",
        "--tracking-uri",
        store.uri,
        "--json",
        str(out_json),
    )
    assert rc == 0, err
    data = json.loads(out_json.read_text())
    assert [r["run_id"] for r in data["runs"]] == [store.linear.run_id]
    assert data["metrics"] == ["train/loss"] and data["differing_params"] == []

    rc, _, err = _run_cli(
        capsys, "compare", "--experiment", "cmp", "--tracking-uri", store.uri, "--json", str(out_json)
    )
    assert rc == 0, err
    assert {r["run_id"] for r in json.loads(out_json.read_text())["runs"]} == {
        store.softmax.run_id,
        store.linear.run_id,
    }


def test_search_follows_page_tokens(store, monkeypatch, capsys):
    """With a page size of 2 every search spans several pages: nothing may be lost or repeated."""
    from mmt.tracking import runs

    monkeypatch.setattr(runs, "_PAGE_SIZE", 2)
    client = MlflowClient(store.uri)
    exp_ids = list(runs.experiments_by_id(client))  # Default, cmp, other, plain, wide: three pages
    assert len(exp_ids) == 5
    found = runs.search_runs(client, exp_ids)
    assert [r.info.run_id for r in found][-3:] == [
        store.other.run_id,
        store.linear.run_id,
        store.softmax.run_id,
    ]
    assert len(found) == 6 and len({r.info.run_id for r in found}) == 6
    assert len(runs.search_runs(client, exp_ids, limit=3)) == 3
    rc, out, _ = _run_cli(capsys, "list", "--tracking-uri", store.uri, "--experiment", "cmp", "--limit", "3")
    assert rc == 0 and all(r.run_id in out for r in (store.softmax, store.linear))


def _has_color(img: Image.Image, rgb: tuple[int, int, int]) -> bool:
    return any(c[1][:3] == rgb for c in img.convert("RGB").getcolors(maxcolors=1 << 20))


def test_compare_plot_png(store, capsys, tmp_path):
    ids = [store.softmax.run_id, store.linear.run_id]
    png = tmp_path / "curves.png"
    rc, _, err = _run_cli(capsys, "compare", *ids, "--tracking-uri", store.uri, "--plot", str(png))
    assert rc == 0, err
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.size == (1000, 2 * 320)  # default: 1000 px wide, 320 px per metric panel (2 metrics)
        # both runs are drawn: matplotlib's first two cycle colours are present
        assert _has_color(img, (0x1F, 0x77, 0xB4)) and _has_color(img, (0xFF, 0x7F, 0x0E))

    png2 = tmp_path / "sub" / "time.png"
    rc, _, err = _run_cli(
        capsys,
        "compare",
        *ids,
        "--tracking-uri",
        store.uri,
        "--metrics",
        "train/loss,train/samples_per_s,train/mfu",
        "--plot",
        str(png2),
        "--x",
        "time",
        "--smooth",
        "0.6",
        "--plot-size",
        "640x480",
    )
    assert rc == 0, err
    with Image.open(png2) as img:
        img.verify()
    with Image.open(png2) as img:
        assert img.size == (640, 480)


def test_best_run_and_checkpoint(store, capsys):
    base = ["best", "--experiment", "cmp", "--tracking-uri", store.uri, "--json"]
    rc, out, err = _run_cli(capsys, *base, "--metric", "val/recall_at_1")
    assert rc == 0, err
    res = json.loads(out)
    # final recall: softmax 0.25, linear 0.40
    assert res["run_id"] == store.linear.run_id and res["mode"] == "max"
    assert res["value"] == pytest.approx(0.40) and res["step"] == VAL_STEPS[-1]
    assert res["checkpoint_dir"] == str(store.linear.checkpoint_dir)
    assert res["latest_checkpoint"] == str(store.linear.checkpoint_dir / f"step_{STEPS - 1:08d}")

    rc, out, _ = _run_cli(capsys, *base, "--metric", "val/recall_at_1", "--mode", "min")
    assert json.loads(out)["run_id"] == store.softmax.run_id
    # by best-ever value: softmax peaked at 0.30 (step 4), linear at 0.40 -> linear; with min: linear 0.20
    rc, out, _ = _run_cli(capsys, *base, "--metric", "val/recall_at_1", "--by", "best", "--mode", "min")
    res = json.loads(out)
    assert res["run_id"] == store.linear.run_id and res["value"] == pytest.approx(0.20) and res["step"] == 4
    # loss: lower is better by default; softmax ends lower (2.0 - 5 * 0.1 vs 2.0 - 5 * 0.05)
    rc, out, _ = _run_cli(capsys, *base, "--metric", "train/loss")
    res = json.loads(out)
    assert res["mode"] == "min" and res["run_id"] == store.softmax.run_id

    rc, out, _ = _run_cli(capsys, *base[:-1], "--metric", "val/recall_at_1")
    assert rc == 0 and store.linear.run_id in out and str(store.linear.checkpoint_dir) in out


def test_errors_name_the_culprit(store, capsys):
    uri = ["--tracking-uri", store.uri]
    rc, _, err = _run_cli(capsys, "compare", store.softmax.run_id, "0123456789abcdef0123456789abcdef", *uri)
    assert rc == 2 and "0123456789abcdef0123456789abcdef" in err and "not found" in err
    for argv in (
        ["list", "--experiment", "no-such-exp"],
        ["compare", "--experiment", "no-such-exp"],
        ["best", "--experiment", "no-such-exp", "--metric", "train/loss"],
    ):
        rc, _, err = _run_cli(capsys, *argv, *uri)
        assert rc == 2 and "'no-such-exp' not found" in err and "cmp" in err, argv
    rc, _, err = _run_cli(capsys, "compare", "--experiment", "cmp", "--filter", "params.x ==== 1", *uri)
    assert rc == 2 and "--filter" in err
    rc, _, err = _run_cli(capsys, "compare", store.softmax.run_id, "--metrics", "val/nope", *uri)
    assert rc == 2 and "'val/nope'" in err
    rc, _, err = _run_cli(capsys, "best", "--experiment", "cmp", "--metric", "val/nope", *uri)
    assert rc == 2 and "'val/nope'" in err
    rc, _, err = _run_cli(capsys, "compare", *uri)
    assert rc == 2 and "RUN_ID" in err


def test_missing_default_store_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run_cli(capsys, "list")
    assert rc == 2 and str(tmp_path.resolve() / "mlflow.db") in err
    assert not (tmp_path / "mlflow.db").exists()  # no empty store created by looking


def test_env_uri_and_mmt_entry_point(store):
    """`mmt runs` through the installed `mmt` command, with the store given by MLFLOW_TRACKING_URI."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    mmt = Path(sys.executable).with_name("mmt")
    proc = subprocess.run(
        [str(mmt), "runs", "list", "--experiment", "cmp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert store.softmax.run_id in proc.stdout and store.linear.run_id in proc.stdout


def test_plain_mlflow_runs(store, capsys, tmp_path):
    """Runs that know nothing of mmt (metrics `loss`, `acc`, param `lr`, no mmt tags) get the same service."""
    uri = ["--tracking-uri", store.uri]
    rc, out, err = _run_cli(capsys, "list", "--experiment", "plain", *uri)
    assert rc == 0, err
    header, _, *body = out.splitlines()
    assert header.split()[-2:] == ["acc", "loss"]  # their own metrics, latest values
    for run in store.plain:
        cells = next(line for line in body if line.startswith(run.run_id)).split()
        assert cells[-2:] == [f"{run.acc[-1]:.4g}", f"{run.loss[-1]:.4g}"] and cells[-3] == "5"  # steps

    png, out_json = tmp_path / "plain.png", tmp_path / "plain.json"
    rc, out, err = _run_cli(
        capsys, "compare", "--experiment", "plain", *uri, "--plot", str(png), "--json", str(out_json)
    )
    assert rc == 0, err
    data = json.loads(out_json.read_text())
    assert data["metrics"] == ["acc", "loss"] and data["differing_params"] == ["lr"]
    recs = {r["run_id"]: r for r in data["runs"]}
    for run in store.plain:
        rec = recs[run.run_id]
        assert rec["params.lr"] == str(run.lr)
        assert rec["loss.final"] == pytest.approx(run.loss[-1]) and rec["loss.best"] == pytest.approx(
            min(run.loss)
        )
        assert rec["acc.best"] == pytest.approx(max(run.acc)) and rec["acc.best_step"] == 5
    assert "acc final" in out and "loss best (min)" in out
    with Image.open(png) as img:
        assert img.size == (1000, 2 * 320)

    rc, out, err = _run_cli(capsys, "best", "--experiment", "plain", "--metric", "acc", "--json", *uri)
    assert rc == 0, err
    res = json.loads(out)
    assert res["run_id"] == store.plain[0].run_id and res["mode"] == "max" and res["checkpoint_dir"] is None
    rc, out, err = _run_cli(capsys, "best", "--experiment", "plain", "--metric", "loss", *uri)
    assert rc == 0 and store.plain[0].run_id in out and "no mmt.checkpoint_dir tag" in out

    # many metrics: a capped default with a note naming what was left out
    rc, out, err = _run_cli(capsys, "compare", store.wide, *uri, "--json", str(out_json))
    assert rc == 0, err
    assert json.loads(out_json.read_text())["metrics"] == [f"m{i:02d}" for i in range(8)]
    assert "showing 8 of the 11 metrics" in err and "m08, m09, m10" in err and "--metrics" in err
