"""The documents' dataset classes over annotation files: the same samples as the shard decoder, training reads
them through the indexed loader with exact resume, and `mmt train` runs on them."""

from __future__ import annotations

import json

import pytest
import torch

from mmt.data.annotations import CaptioningDataset, ImageTextDataset, VQADataset
from mmt.data.build.demo import ANSWER_VOCAB
from mmt.data.cli import main as shards_main
from mmt.data.loader import build_eval_loader, build_train_loader
from tests.fixtures_data import data_config
from tests.fixtures_train import eval_row, mmt_single, run, write_config


@pytest.fixture(scope="module")
def annotations(tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "demo"
    assert shards_main(["demo", "--annotations", str(out)]) == 0
    return out


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_datasets_yield_the_shard_decoders_samples(annotations, demo_run, tmp_path):
    """The annotation demo and the shard demo (same seed) decode to identical samples, for each task."""
    info = json.loads((demo_run["data"] / "demo.json").read_text())
    for cls, task, extra in (
        (ImageTextDataset, "retrieval", {}),
        (CaptioningDataset, "captioning", {}),
        (VQADataset, "vqa", {"answer_vocab": ANSWER_VOCAB}),
    ):
        overrides = ("model.heads.vqa_answers=12",) if task == "vqa" else ()
        cfg = data_config(tmp_path, task, overrides, val_urls=info["val_urls"], train_urls=info["train_urls"])
        ds = cls(annotations / "val.jsonl", config=cfg, **extra)
        assert len(ds) == 180
        shard_batch = next(iter(build_eval_loader(cfg, 0, 1, 4)))
        rows = [ds[i] for i in range(4)]
        assert [r["key"] for r in rows] == shard_batch["keys"]
        batch, _ = ds.collate(rows)
        _equal(batch, shard_batch)
        assert rows[0]["label"] == json.loads(ds.raw(0)[1]["json"])["label"]


def test_annotation_training_resumes_exactly(annotations, tmp_path):
    cfg = data_config(
        tmp_path,
        overrides=("data.format=annotations", "data.image.hflip=0.5", "data.image.color_jitter=0.2"),
        train_urls=str(annotations / "val.jsonl"),
    )
    first = build_train_loader(cfg, 0, 1, 8)
    it = iter(first)
    next(it)
    state = first.state_dict()
    expected = [next(it), next(it)]
    resumed = build_train_loader(cfg, 1, 2, 8)  # another world size: rank 1 of 2 takes rows 4..7
    resumed.load_state_dict(state)
    got = list(zip(iter(resumed), range(2)))
    for (b, _), ref in zip(got, expected):
        assert b["keys"] == ref["keys"][4:]
        assert torch.equal(b["image_features"], ref["image_features"][4:])


def test_mmt_train_on_annotations(annotations, tmp_path):
    cfg = write_config(
        tmp_path / "ann.yaml",
        train_urls=str(annotations / "val.jsonl"),
        val_urls=str(annotations / "val.jsonl"),
        run_dir=tmp_path / "run",
        data={"format": "annotations"},
        train={"max_steps": 2, "zero_stage": 0, "eval_max_batches": 2},
    )
    run(mmt_single(str(cfg)), cwd=tmp_path, timeout=300)
    assert eval_row(tmp_path / "run")["val/samples"] == 16  # 2 batches of 8 held-out records
