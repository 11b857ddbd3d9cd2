"""`mmt shards build` / `demo` / `stats`: every input format and task, broken inputs reported, byte-identical
rebuilds, the manifest, index sidecars, resizing / resampling, and the demo dataset's learnable signal."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmt.data.build.builder import BuildOptions, build_shards
from mmt.data.build.process import ProcessOptions
from mmt.data.cli import main as shards_main
from mmt.data.loader import build_eval_loader
from mmt.data.storage import expand
from mmt.data.tarindex import ShardIndex, scan_file
from tests.fixtures_data import data_config


def _image(path: Path, size=(40, 30), fmt="JPEG", seed=0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)


def _wav(path: Path, sr=16000, seconds=0.3, freq=440.0) -> None:
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


@pytest.fixture
def media_dir(tmp_path) -> Path:
    d = tmp_path / "media"
    d.mkdir()
    for i in range(6):
        _image(d / f"img{i}.jpg", size=(40 + 8 * i, 30), seed=i)
    _image(d / "img_png.png", fmt="PNG")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    for i in range(3):
        _wav(d / f"a{i}.wav", freq=300 + 100 * i)
    (d / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    return d


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _build(inp: Path | str, out: Path, task: str, **kw) -> dict:
    proc = {k: kw.pop(k) for k in list(kw) if k in ProcessOptions.__dataclass_fields__}
    return build_shards(
        BuildOptions(str(inp), str(out), progress=False, process=ProcessOptions(task=task, **proc), **kw)
    )


def test_folder_retrieval_with_broken_inputs(tmp_path, media_dir):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(4):
        (folder / f"x{i}.jpg").write_bytes((media_dir / f"img{i}.jpg").read_bytes())
        (folder / f"x{i}.txt").write_text(f"a photo number {i}\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "y.png").write_bytes((media_dir / "img_png.png").read_bytes())
    (folder / "sub" / "y.txt").write_text("a png in a sub folder")
    (folder / "sub" / "y.json").write_text(json.dumps({"source_id": 7}))
    (folder / "bad.jpg").write_bytes((media_dir / "corrupt.jpg").read_bytes())
    (folder / "bad.txt").write_text("a caption for a broken image")
    (folder / "nocaption.jpg").write_bytes((media_dir / "img5.jpg").read_bytes())
    out = tmp_path / "out"
    m = _build(folder, out, "retrieval", max_samples_per_shard=2)
    assert m["num_samples"] == 5 and m["num_shards"] == 3
    failed = {f["key"]: f["error"] for f in m["failures"]}
    assert set(failed) == {"bad", "nocaption"}
    assert "image" in failed["bad"] and "caption" in failed["nocaption"]
    assert any(f["input"].endswith("bad") for f in m["failures"])
    members = _members(out / "shard-000000.tar")  # sorted paths: sub/y, x0 | x1, x2 | x3
    assert list(members) == ["sub_y.json", "sub_y.png", "sub_y.txt", "x0.jpg", "x0.json", "x0.txt"]
    assert members["sub_y.png"] == (folder / "sub" / "y.png").read_bytes()  # png bytes kept as they were
    meta = json.loads(members["sub_y.json"])
    assert meta["caption"] == "a png in a sub folder" and meta["source_id"] == 7 and meta["width"] == 40
    # the manifest
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert [s["name"] for s in m["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["modalities"] == {"image": 5, "text": 5}
    assert m["options"]["max_samples_per_shard"] == 2 and m["options"]["task"] == "retrieval"
    assert m["urls"] == f"{out}/shard-{{000000..000002}}.tar" and len(expand(m["urls"])) == 3
    # the index sidecar equals a scan of the tar headers
    for url in expand(m["urls"]):
        sidecar = ShardIndex.from_json(Path(url + ".idx.json").read_text(), url)
        assert sidecar.samples == scan_file(url).samples and sidecar.size == Path(url).stat().st_size


def test_rebuild_is_byte_identical_with_any_worker_count(tmp_path, media_dir):
    rows = [{"image": f"media/img{i}.jpg", "caption": f"caption {i}"} for i in range(6)]
    rows.append({"image": "media/corrupt.jpg", "caption": "broken"})
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = _build(
        manifest,
        tmp_path / "a",
        "retrieval",
        max_samples_per_shard=4,
        image_size=16,
        resize_mode="center_crop",
    )
    b = _build(
        manifest,
        tmp_path / "b",
        "retrieval",
        max_samples_per_shard=4,
        image_size=16,
        resize_mode="center_crop",
        workers=2,
    )
    assert a["num_samples"] == 6 and a["num_failures"] == 1
    for s in a["shards"]:
        assert (tmp_path / "a" / s["name"]).read_bytes() == (tmp_path / "b" / s["name"]).read_bytes()
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        info = tar.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (946684800, 0, 0, "", "")
        img = Image.open(io.BytesIO(tar.extractfile("img0.jpg").read()))
        assert img.size == (16, 16)  # --image-size 16 --resize-mode center_crop


def test_csv_captioning_and_max_shard_bytes(tmp_path, media_dir):
    path = tmp_path / "caps.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "filepath", "captions"])
        w.writeheader()
        for i in range(6):
            w.writerow(
                {
                    "id": f"c{i}",
                    "filepath": f"media/img{i}.jpg",
                    "captions": json.dumps([f"one {i}", f"two {i}"]),
                }
            )
        w.writerow({"id": "missing", "filepath": "media/nope.jpg", "captions": "x"})
    m = _build(path, tmp_path / "out", "captioning", max_shard_bytes=6000)
    assert m["num_samples"] == 6 and [f["key"] for f in m["failures"]] == ["missing"]
    assert "No such file" in m["failures"][0]["error"] and m["failures"][0]["input"].endswith("caps.csv:8")
    assert m["num_shards"] > 1
    for s in m["shards"]:
        assert s["bytes"] <= 6000 + 10240 or s["samples"] == 1  # the tar end-of-archive record pads to 10 KiB
    members = _members(tmp_path / "out" / "shard-000000.tar")
    assert json.loads(members["c0.json"])["captions"] == ["one 0", "two 0"] and members["c0.txt"] == b"one 0"


def test_json_vqa_answers_vocabulary(tmp_path, media_dir):
    items = [
        {
            "image_id": i,
            "image": f"media/img{i}.jpg",
            "question": "what is it?",
            "answers": [{"answer": "Cat."}, {"answer": "cat"}, {"answer": "dog"}] if i % 2 else ["dog"] * 3,
        }
        for i in range(5)
    ]
    items.append({"image_id": 99, "image": "media/img0.jpg", "question": "no answers"})
    (tmp_path / "train.json").write_text(json.dumps({"questions": items}))
    m = _build(tmp_path / "train.json", tmp_path / "out", "vqa")
    assert m["num_samples"] == 5 and m["failures"][0]["key"] == "99"
    vocab = json.loads((tmp_path / "out" / "answers.json").read_text())
    assert (
        vocab["answers"] == ["dog", "cat"]
        and vocab["counts"] == [11, 4]
        and m["answer_vocab"] == "answers.json"
    )
    meta = json.loads(_members(tmp_path / "out" / "shard-000000.tar")["1.json"])
    assert meta["question"] == "what is it?" and meta["answers"] == ["cat", "cat", "dog"]
    cfg = data_config(
        tmp_path, "vqa", ["model.heads.vqa_answers=2"], train_urls=m["urls"], val_urls=m["urls"]
    )
    batch = next(iter(build_eval_loader(cfg, 0, 1, 5)))
    torch.testing.assert_close(batch["answer_targets"][1], torch.tensor([1 / 3, 2 / 3]))
    assert not batch["audio_present"].any()


def test_jsonl_audio_text_resampled(tmp_path, media_dir):
    lines = [{"audio": f"media/a{i}.wav", "text": f"a tone {i}"} for i in range(3)]
    lines.append({"audio": "media/broken.wav", "text": "broken"})
    (tmp_path / "audio.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    m = _build(tmp_path / "audio.jsonl", tmp_path / "out", "audio-text", audio_rate=8000, audio_format="flac")
    assert (
        m["num_samples"] == 3 and m["failures"][0]["key"] == "broken" and "audio" in m["failures"][0]["error"]
    )
    members = _members(tmp_path / "out" / "shard-000000.tar")
    wav, sr = sf.read(io.BytesIO(members["a1.flac"]))
    assert sr == 8000 and len(wav) == 2400
    peak = np.argmax(np.abs(np.fft.rfft(wav)))  # the 400 Hz tone survives resampling
    assert abs(peak * sr / len(wav) - 400) < 5
    cfg = data_config(tmp_path, train_urls=m["urls"], val_urls=m["urls"])
    batch = next(iter(build_eval_loader(cfg, 0, 1, 3)))
    assert batch["audio_present"].all() and (batch["audio_attention_mask"].sum(1) == 2400).all()
    assert not batch["image_present"].any()


def test_cli_build_stats_and_spectrogram(tmp_path, media_dir, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        (folder / f"k{i}.jpg").write_bytes((media_dir / f"img{i}.jpg").read_bytes())
        (folder / f"k{i}.txt").write_text("word " * (i * 4 + 1))
        (folder / f"k{i}.wav").write_bytes((media_dir / f"a{i}.wav").read_bytes())
    assert (
        shards_main(["build", str(folder), str(tmp_path / "out"), "--quiet", "--max-shard-bytes", "1MB"]) == 0
    )
    assert "wrote 3 samples in 1 shards" in capsys.readouterr().out
    assert shards_main(["stats", str(tmp_path / "out" / "shard-000000.tar"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 3 and stats["coverage"] == {
        "image": 1.0,
        "text": 1.0,
        "audio": 1.0,
        "json": 1.0,
    }
    assert stats["caption_words_histogram"] == {"0-4": 1, "5-9": 2}
    assert stats["image_size_histogram"] == {"33-64px": 3} and stats["audio_seconds"]["max"] == 0.3
    url = str(tmp_path / "out" / "shard-000000.tar")
    cfg = data_config(tmp_path, "retrieval", ("model.audio.input=spectrogram",), val_urls=url)
    batch = next(iter(build_eval_loader(cfg, 0, 1, 3)))
    assert batch["audio_features"].shape == (3, 8000 // 128 + 1, 32)  # (B, frames, n_mels)
    assert (batch["audio_attention_mask"].sum(1) == 2400 // 128 + 1).all()  # 0.3 s at 16 kHz, loaded at 8 kHz


def test_cli_index_for_foreign_shards(tmp_path, capsys):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert shards_main(["index", str(tmp_path / "t.tar")]) == 0
    assert [s.key for s in ShardIndex.from_json((tmp_path / "t.tar.idx.json").read_text(), "").samples] == [
        "a",
        "b",
    ]


def test_demo_dataset(tmp_path, capsys):
    """The demo: every field present, three tasks load, and the signal is learnable (nearest class centroid)."""
    out = tmp_path / "demo"
    assert shards_main(["demo", str(out)]) == 0
    info = json.loads((out / "demo.json").read_text())
    assert info["train_samples"] == 1617 and info["val_samples"] == 180
    assert info["train_urls"] == f"{out}/train/shard-{{000000..000006}}.tar"
    assert json.loads((out / "answers.json").read_text())["answers"] == [str(d) for d in range(10)] + [
        "yes",
        "no",
    ]
    feats, labels = {}, {}
    subsets = {"train": f"{out}/train/shard-{{000000..000002}}.tar", "val": info["val_urls"]}  # keeps it fast
    for split, urls in subsets.items():
        cfg = data_config(
            tmp_path, "vqa", ["model.heads.vqa_answers=12"], train_urls=info["train_urls"], val_urls=urls
        )
        rows, ys = [], []
        for batch in build_eval_loader(cfg, 0, 1, 256):
            assert batch["answer_targets"].max(1).values.eq(1).all()  # ten annotators, at most one disagrees
            for m in ("text", "image", "audio"):
                assert batch[f"{m}_present"].all()
            spec = torch.stft(
                batch["audio_features"], 256, 128, window=torch.hann_window(256), return_complex=True
            )
            rows.append((batch["image_features"].flatten(1), spec.abs().mean(-1)))
            ys += [int(k.removeprefix("digit")) for k in batch["keys"]]
        feats[split] = [torch.cat([r[i] for r in rows]) for i in range(2)]
        labels[split] = torch.tensor(ys)
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target)
    for i, name in enumerate(("image", "audio")):
        x, y = feats["train"][i], target[labels["train"]]
        centroids = torch.stack([x[y == d].mean(0) for d in range(10)])
        pred = torch.cdist(feats["val"][i], centroids).argmin(1)
        accuracy = (pred == target[labels["val"]]).float().mean().item()
        assert accuracy > 0.8, f"{name}: nearest-centroid accuracy {accuracy:.2f}"
    cfg = data_config(tmp_path, "captioning", val_urls=info["val_urls"])
    batch = next(iter(build_eval_loader(cfg, 0, 1, 8)))
    caption = bytes(
        i - 3 for i in batch["text_inputs"][0][batch["text_attention_mask"][0]].tolist()[1:-1]
    ).decode()
    digit = int(target[int(batch["keys"][0].removeprefix("digit"))])
    assert (
        str(digit) in caption
        or ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][digit] in caption
    )
