"""Hostile shards: members named with '..' or absolute paths, symlinks and hard links, a decompression-bomb image
and an oversized JSON member -- each sample skipped and counted with its reason, nothing extracted, nothing
oversized read, in both loaders."""

from __future__ import annotations

import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmt.data.loader import build_train_loader
from tests.fixtures_data import data_config, epoch_keys
from tests.test_data_faults import N, _shards

REASONS = {
    "escape01": "absolute or '..' path",
    "abs01": "absolute or '..' path",
    "link01": "is a symlink to '/etc/passwd'",
    "hard01": "is a hard link",
    "big01": "more than data.max_member_mb",
    "bomb01": "decompression bomb",
}


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A few hundred bytes whose header claims width x height pixels (100 M: over Pillow's warning limit, under
    its error limit, so only mmt's own bound stops it)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR", data (13), crc (4)
    png[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    png[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(png[ihdr + 4 : ihdr + 21])))
    return bytes(png)


def make_hostile(shard: Path) -> None:
    """Append hostile samples to a real shard; the ones with real payloads copy a good sample's members."""
    with tarfile.open(shard) as tar:
        good = {
            m.name.split(".", 1)[1]: tar.extractfile(m).read()
            for m in tar
            if m.name.startswith("sample000000.")
        }

    with tarfile.open(shard, "a") as tar:

        def add(name: str, data: bytes = b"", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in attrs.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("../escape01.txt", b"a caption")
        add("/abs/abs01.txt", b"a caption")
        add("link01.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("link01.txt", b"a caption")
        add("hard01.jpg", type=tarfile.LNKTYPE, linkname="sample000000.jpg")
        add("hard01.txt", b"a caption")
        for ext, data in good.items():
            add(f"bomb01.{ext}", bomb_png() if ext == "jpg" else data)
        for ext, data in good.items():
            add(f"big01.{ext}", b'{"pad": "' + b"x" * 40_000 + b'"}' if ext == "json" else data)


@pytest.mark.parametrize("loader_kind", ["indexed", "streaming"])
def test_hostile_samples_are_skipped_and_counted(tmp_path, caplog, loader_kind, monkeypatch):
    urls = _shards(tmp_path / "s")
    make_hostile(tmp_path / "s" / "shard-000000.tar")
    monkeypatch.chdir(tmp_path)
    cfg = data_config(
        tmp_path,
        train_urls=urls,
        loader=loader_kind,
        shuffle=False,
        max_member_mb=0.02,  # 20 KiB: the 40 KB JSON stands for a 1 GB one
        max_failure_fraction=0.5,
        failure_check_after=1,
    )
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(cfg, 0, 1, 5)
        keys = sum(epoch_keys(loader), [])
    good = {f"sample{i:06d}" for i in range(N)}
    assert set(keys) <= good and len(keys) >= N - 5, (
        keys
    )  # no hostile one (the last partial batch is dropped)
    logged = " | ".join(r.getMessage() for r in caplog.records)
    for key, reason in REASONS.items():
        assert any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records), (key, logged)
    stats = loader.stats()
    assert stats["samples_failed"] == len(REASONS) and stats.get("shards_failed", 0) == 0, stats
    assert not list(tmp_path.parent.glob("escape01*")) and not (Path("/abs") / "abs01.txt").exists()


def test_shard_builder_writes_only_into_its_output_folder(tmp_path):
    from mmt.data.build.builder import write_samples
    from mmt.data.build.inputs import InputError
    from mmt.data.build.process import Processed
    from mmt.data.synthetic import synthetic_sample

    def samples(keys):
        for i, key in enumerate(keys):
            yield Processed(key, str(i), {**synthetic_sample(i), "__key__": key})

    out = tmp_path / "deep" / "out"
    manifest = write_samples(samples(["ok01", "../../escape01", "/abs01", "a/../../b01"]), str(out))
    assert manifest["num_samples"] == 1
    assert sorted(f["key"] for f in manifest["failures"]) == ["../../escape01", "/abs01", "a/../../b01"]
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} == {out}
    with pytest.raises(InputError, match="a shard name, not a path"):
        write_samples(samples(["ok02"]), str(out), prefix="../shard")
    assert not list(tmp_path.glob("deep/shard*"))
