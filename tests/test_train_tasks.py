"""VQA and captioning train a few steps and evaluate end to end (one process); `mmt eval` on the saved
checkpoint reproduces the end-of-training evaluation. The metrics themselves are checked against hand-worked
cases in test_train_units.py."""

from __future__ import annotations

import json
import math

import pytest

from tests.fixtures_train import PY, eval_row, run, train_rows, write_config, write_shards


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    train, val = write_shards(tmp / "train", 32), write_shards(tmp / "val", 12, seed=1)
    vqa = write_config(
        tmp / "vqa.yaml",
        task="vqa",
        train_urls=train,
        val_urls=val,
        run_dir=tmp / "vqa",
        model={"heads": {"contrastive": True, "embed_dim": 64, "vqa_answers": 8}},
        train={"max_steps": 4, "grad_accum": 2, "checkpoint_at_end": True},
    )
    cap = write_config(
        tmp / "cap.yaml",
        task="captioning",
        train_urls=train,
        val_urls=val,
        run_dir=tmp / "cap",
        model={"decoder": {"depth": 1, "max_len": 48}},
        train={"max_steps": 3, "tasks": {"captioning": {"max_tokens": 6}}},
    )
    # one process runs both (no launcher: world size 1)
    run([PY, "-m", "tests.fixtures_train", "train", str(tmp), str(vqa), str(cap)], cwd=tmp, timeout=300)
    ev = run(
        [
            PY,
            "-m",
            "mmt.cli",
            "eval",
            str(vqa),
            "--checkpoint",
            str(tmp / "vqa"),
            "--output",
            str(tmp / "vqa_eval.json"),
        ],
        cwd=tmp,
        timeout=300,
    )
    return {"tmp": tmp, "eval_stdout": ev.stdout}


def test_vqa_trains_with_grad_accumulation_and_reports_vqa_accuracy(task_runs):
    tmp = task_runs["tmp"]
    rows = train_rows(tmp / "vqa")
    assert sorted(rows) == [1, 2, 3, 4] and all(math.isfinite(r["train/loss"]) for r in rows.values())
    ev = eval_row(tmp / "vqa")
    assert ev["step"] == 4 and ev["val/samples"] == 12
    # each of the 12 questions scores 0, 1/3, 2/3 or 1
    assert (
        0.0 <= ev["val/vqa_accuracy"] <= 1.0
        and round(ev["val/vqa_accuracy"] * 36) == ev["val/vqa_accuracy"] * 36
    )
    assert math.isfinite(ev["val/loss"])


def test_mmt_eval_reproduces_the_training_evaluation(task_runs):
    tmp = task_runs["tmp"]
    got = json.loads((tmp / "vqa_eval.json").read_text())
    ev = eval_row(tmp / "vqa")
    assert got["step"] == 4 and got["checkpoint"].endswith("step_00000004")
    assert got["val/vqa_accuracy"] == pytest.approx(ev["val/vqa_accuracy"])
    assert got["val/loss"] == pytest.approx(
        ev["val/loss"], rel=1e-5
    )  # consolidated fp32 weights, ZeRO-0 engine


def test_captioning_trains_and_reports_perplexity_and_bleu(task_runs):
    tmp = task_runs["tmp"]
    rows = train_rows(tmp / "cap")
    assert sorted(rows) == [1, 2, 3]
    # label smoothing 0.1: the training loss differs from the plain token NLL logged beside it
    assert all(r["train/loss"] != pytest.approx(r["train/nll"], abs=1e-6) for r in rows.values())
    ev = eval_row(tmp / "cap")
    # perplexity's definition (token-weighted NLL over uneven batches) is checked in test_metric_references.py
    assert math.isfinite(ev["val/perplexity"]) and ev["val/perplexity"] > 1.0
    assert 0.0 <= ev["val/bleu4"] <= 1.0 and ev["val/samples"] == 12
