"""Using a trained model: raw inputs reach the model exactly as the loader's tensors do, the documents' example
runs, zero-shot accuracy through the API matches what training's evaluation logged, bad inputs are one line.

The model is the short `mmt demo` run of `tests/fixtures_wheel.py` (made once per session by the wheel install).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import mmt
from mmt.ckpt.layout import CheckpointError
from mmt.config import load_config
from mmt.data.build.demo import TEMPLATES, WORDS
from mmt.data.loader import build_eval_loader
from mmt.data.shards import iter_tar_samples
from mmt.inference.media import InputError

KEYS = ("text_inputs", "text_attention_mask", "image_features", "audio_features", "audio_attention_mask")


@pytest.fixture(scope="module")
def trained(demo_run):
    model, preprocess = mmt.create_model_and_transforms(demo_run["run_dir"])
    return model, preprocess


def _val_samples(demo_run) -> dict[str, dict]:
    info = json.loads((demo_run["data"] / "demo.json").read_text())
    url = info["val_urls"]
    with open(url, "rb") as f:
        return {s["__key__"]: s for s in iter_tar_samples(f, url)}


def test_raw_inputs_give_the_loaders_embeddings(demo_run, trained, tmp_path):
    model, _ = trained
    cfg = load_config(
        demo_run["run_dir"] / "config.yaml", ["data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"]
    )
    batch = next(iter(build_eval_loader(cfg, 0, 1, 6)))
    samples = _val_samples(demo_run)
    texts, images, audio = [], [], []
    for key in batch["keys"]:
        s = samples[key]
        texts.append(json.loads(s["json"])["captions"][0])  # evaluation reads the first caption
        (tmp_path / f"{key}.jpg").write_bytes(s["jpg"])
        (tmp_path / f"{key}.wav").write_bytes(s["wav"])
        images.append(tmp_path / f"{key}.jpg")
        audio.append(str(tmp_path / f"{key}.wav"))
    with torch.no_grad():
        ref = model(**{k: batch[k] for k in KEYS}).embeddings
        raw = model(text_inputs=texts, image_features=images, audio_features=audio).embeddings
        loaded = [mmt.load_image(p) for p in images]
        waves = [mmt.load_audio(p) for p in audio]
        by_encode = {
            "text": model.encode_text(texts),
            "image": model.encode_image(loaded),
            "audio": model.encode_audio(waves),
        }
    for m in ("text", "image", "audio"):
        assert torch.equal(raw[m], ref[m]), m
        assert torch.equal(by_encode[m], ref[m]), m
        torch.testing.assert_close(ref[m].norm(dim=-1), torch.ones(len(texts)))
    # a numpy waveform at the model's rate is the same input as the file; alone in its batch, so only float
    # summation order differs (batched matmuls): fp32 rounding tolerance
    wave = waves[0].wave
    assert waves[0].sample_rate == model.cfg.audio.sample_rate
    with torch.no_grad():
        torch.testing.assert_close(model.encode_audio(wave), ref["audio"][:1], rtol=0, atol=1e-5)


def test_documents_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save("horse.jpg")
    from mmt import create_model, load_image

    model = create_model("tiny_tri")
    outputs = model(text_inputs="A person riding a horse", image_features=load_image("horse.jpg"))
    assert outputs.embeddings["text"].shape == outputs.embeddings["image"].shape == (1, 64)
    tokens = mmt.get_tokenizer("tiny_tri")(["A person riding a horse", "a"])
    assert tokens["text_inputs"].shape == (2, 25) and tokens["text_attention_mask"][1].sum() == 3


def test_zero_shot_api_matches_training_evaluation(demo_run, trained):
    """The API's prompt-ensembled classifier over the raw held-out files reproduces the logged val metric."""
    model, _ = trained
    templates = [t.replace("{word}", "{c}").replace("{d}", "{i}") for t in TEMPLATES]
    classifier = mmt.zero_shot_classifier(model, WORDS, templates)
    assert classifier.shape == (64, 10)
    samples = _val_samples(demo_run)
    labels = torch.tensor([json.loads(s["json"])["label"] for s in samples.values()])
    ev = demo_run["final"]["eval"]
    with torch.no_grad():
        embeddings = {
            "image": model.encode_image([Image.open(io.BytesIO(s["jpg"])) for s in samples.values()]),
            "audio": model.encode_audio(
                [mmt.Waveform(*sf.read(io.BytesIO(s["wav"]), dtype="float32")) for s in samples.values()]
            ),
        }
    for m, x in embeddings.items():
        acc = mmt.zero_shot_accuracy(x, labels, classifier)
        # evaluation batches differ from these: allow one sample whose top class flips on float rounding
        assert abs(acc[1] - ev[f"val/zero_shot_{m}_top1"]) <= 1.0 / len(labels) + 1e-9, (m, acc, ev)
        assert acc[5] >= acc[1]
    assert ev["val/zero_shot_audio_top1"] > 0.5  # a short run already separates the tones


def test_bad_inputs_are_one_line(demo_run, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError) as e:
        mmt.load_image(tmp_path / "broken.jpg")
    assert "broken.jpg" in str(e.value) and "\n" not in str(e.value)
    model = mmt.create_model("tiny_tri")
    with pytest.raises(InputError) as e:
        model(image_features=str(tmp_path / "missing.jpg"))
    assert "missing.jpg" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        mmt.create_model_and_transforms("tiny_text_image", pretrained=demo_run["run_dir"])
    msg = str(e.value)
    assert "tiny_text_image" in msg and "audio" in msg and "\n" not in msg
