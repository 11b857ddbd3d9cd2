"""The training / eval loaders: batch contract per task, exact resume (same and different world size),
rank x worker splits, shards written by other tools."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmt.data.faults import DataError
from mmt.data.indexed import epoch_order
from mmt.data.loader import build_eval_loader, build_train_loader
from mmt.data.samples import pack_tensors, soft_scores
from mmt.data.streaming import split_shards
from mmt.data.synthetic import COLOURS, write_synthetic_shards
from tests.fixtures_data import data_config, epoch_keys

N, PER_SHARD = 96, 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("shards")
    manifest = write_synthetic_shards(str(out), N, PER_SHARD)
    return {"urls": manifest["urls"], "dir": out, "keys": [f"sample{i:06d}" for i in range(N)]}


def _global_batches(loaders) -> list[list[str]]:
    """Global batch b = concatenation of each rank's batch b, in rank order."""
    per_rank = [epoch_keys(ld) for ld in loaders]
    assert len({len(p) for p in per_rank}) == 1, "ranks yielded different numbers of batches"
    return [sum((p[b] for p in per_rank), []) for b in range(len(per_rank[0]))]


def test_retrieval_batch_contract(tmp_path, shards):
    cfg = data_config(tmp_path, train_urls=shards["urls"])
    batch = next(iter(build_train_loader(cfg, 0, 1, 8)))
    b = 8
    assert len(batch["keys"]) == b
    assert batch["text_inputs"].dtype == torch.long and batch["text_inputs"].shape[0] == b
    assert batch["text_attention_mask"].dtype == torch.bool
    assert batch["text_inputs"].shape[1] <= 48  # model.text.max_len of tiny_tri
    assert (batch["text_inputs"][:, 0] == 1).all()  # ByteTokenizer bos
    lengths = batch["text_attention_mask"].sum(1)
    assert (batch["text_inputs"][torch.arange(b), lengths - 1] == 2).all()  # eos at the end of each row
    assert batch["image_features"].shape == (b, 3, 32, 32) and batch["image_features"].dtype == torch.float32
    assert batch["audio_features"].shape == (b, 8000)  # 1.0 s at 8000 Hz
    assert batch["audio_attention_mask"].shape == (b, 8000)
    assert (batch["audio_attention_mask"].sum(1) == 2000).all()  # 0.25 s clips
    assert (batch["audio_features"][~batch["audio_attention_mask"]] == 0).all()
    for m in ("text", "image", "audio"):
        assert batch[f"{m}_present"].all()
    assert "answer_targets" not in batch


def test_vqa_and_captioning_batches(tmp_path, shards):
    cfg = data_config(
        tmp_path, "vqa", ["model.heads.vqa_answers=8"], train_urls=shards["urls"], val_urls=shards["urls"]
    )
    batch = next(iter(build_eval_loader(cfg, 0, 1, 4)))
    assert batch["answer_targets"].shape == (4, len(COLOURS))
    for key, target in zip(batch["keys"], batch["answer_targets"]):
        meta = json.loads(_member(shards, key, "json"))
        expected = torch.zeros(len(COLOURS))
        expected[meta["label"]] = 1.0  # three annotators agree: min(1, 3/3)
        torch.testing.assert_close(target, expected)
    question = batch["text_inputs"][0][batch["text_attention_mask"][0]].tolist()
    assert bytes(i - 3 for i in question[1:-1]).decode() == "what colour is it?"

    cfg = data_config(tmp_path, "captioning", train_urls=shards["urls"], val_urls=shards["urls"])
    batch = next(iter(build_eval_loader(cfg, 0, 1, 4)))
    ids = batch["text_inputs"][0][batch["text_attention_mask"][0]].tolist()
    assert bytes(i - 3 for i in ids[1:-1]).decode() == "a red square number 0".replace(
        "red", COLOURS[json.loads(_member(shards, batch["keys"][0], "json"))["label"]]
    )


def test_vqa_soft_scores_and_vocab_check(tmp_path, shards):
    vocab = {"yes": 0, "no": 1, "2": 2}
    torch.testing.assert_close(
        soft_scores(["yes", "yes", "no", "2", "2", "2", "2", "maybe"], vocab),
        torch.tensor([2 / 3, 1 / 3, 1.0]),
    )
    cfg = data_config(tmp_path, "vqa", ["model.heads.vqa_answers=5"], train_urls=shards["urls"])
    with pytest.raises(Exception, match="model.heads.vqa_answers.*8 answers"):
        build_train_loader(cfg, 0, 1, 8)


def _member(shards, key: str, ext: str) -> bytes:
    i = int(key.removeprefix("sample"))
    with tarfile.open(shards["dir"] / f"shard-{i // PER_SHARD:06d}.tar") as tar:
        return tar.extractfile(f"{key}.{ext}").read()


def test_epoch_order_is_a_seeded_permutation():
    counts = np.array([5, 7, 3, 9])
    a, b = epoch_order(counts, 1, 0), epoch_order(counts, 1, 0)
    assert (a == b).all() and sorted(a.tolist()) == list(range(24))
    assert not (epoch_order(counts, 1, 1) == a).all()
    windowed = epoch_order(counts, 1, 0, shard_window=2)
    assert sorted(windowed.tolist()) == list(range(24))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shard_of = np.searchsorted(starts, windowed, side="right") - 1
    a = shard_of[0]
    b = next(s for s in shard_of if s != a)
    n = counts[a] + counts[b]
    assert set(shard_of[:n].tolist()) == {a, b}  # the first window: all samples of two shards, shuffled
    assert len(set(shard_of[n:].tolist())) == 2  # then the other window


def test_rank_split_covers_every_sample_once(tmp_path, shards):
    cfg = data_config(tmp_path, train_urls=shards["urls"], num_workers=2)
    loaders = [build_train_loader(cfg, r, 2, 8) for r in range(2)]
    batches = _global_batches(loaders)
    keys = sum(batches, [])
    assert sorted(keys) == shards["keys"]  # every sample exactly once
    assert all(len(b) == 8 for b in batches)
    again = _global_batches(loaders)  # next epoch: a different order, the same samples
    assert sorted(sum(again, [])) == shards["keys"] and again != batches


def test_last_partial_global_batch_dropped(tmp_path, shards):
    cfg = data_config(tmp_path, train_urls=shards["urls"])
    batches = _global_batches([build_train_loader(cfg, r, 3, 15) for r in range(3)])
    keys = sum(batches, [])
    assert len(batches) == N // 15 and len(keys) == len(set(keys)) == (N // 15) * 15


def test_resume_same_world_size_with_workers(tmp_path, shards):
    """2 ranks x 2 workers: batches before the interruption + after resuming == the uninterrupted epoch."""
    cfg = data_config(tmp_path, train_urls=shards["urls"], num_workers=2)
    full, tensors = [], []
    for r in range(2):
        loader = build_train_loader(cfg, r, 2, 8)
        assert loader._started is not None  # workers already decoding (IndexedLoader.start); used below
        batches = list(loader)
        full.append([b["keys"] for b in batches])
        tensors.append(batches[5]["image_features"])
    for r in range(2):
        first = build_train_loader(cfg, r, 2, 8)
        head = epoch_keys(first, limit=5)
        state = first.state_dict()
        assert state["samples_consumed"] == 5 * 8 and state["epoch"] == 0
        resumed = build_train_loader(cfg, r, 2, 8)
        resumed.load_state_dict(state)  # after start(): its batches from position 0 are discarded
        resumed.set_epoch(0)  # the trainer may call this: it keeps the resumed position
        tail = list(resumed)
        assert head + [b["keys"] for b in tail] == full[r]
        torch.testing.assert_close(tail[0]["image_features"], tensors[r], rtol=0, atol=0)  # same augmentation
        assert resumed.epoch == 1 and resumed.state_dict()["samples_consumed"] == 0
    # A worker packs a batch's tensors into one shared buffer (one handover per batch): same batch as in-process.
    in_process = list(
        build_train_loader(data_config(tmp_path, train_urls=shards["urls"], num_workers=0), 1, 2, 8)
    )
    assert [b["keys"] for b in in_process] == full[1]
    assert {k for k, v in tail[0].items() if isinstance(v, torch.Tensor)} == {
        k for k, v in in_process[5].items() if isinstance(v, torch.Tensor)
    }
    for k, v in tail[0].items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == in_process[5][k].dtype and torch.equal(v, in_process[5][k]), k
    assert len({v.untyped_storage().data_ptr() for v in tail[0].values() if isinstance(v, torch.Tensor)}) == 1


def test_pack_tensors_keeps_values_shapes_and_dtypes_in_one_buffer():
    batch = {
        "keys": ["a", "b"],
        "ids": torch.arange(6).view(2, 3),
        "mask": torch.tensor([[True, False, True], [False, False, True]]),
        "x": torch.randn(2, 3, 5).transpose(1, 2),  # not contiguous
        "empty": torch.zeros(2, 0),
    }
    packed = pack_tensors(batch)
    assert packed["keys"] == ["a", "b"] and packed.keys() == batch.keys()
    for k in ("ids", "mask", "x", "empty"):
        assert packed[k].dtype == batch[k].dtype and torch.equal(packed[k], batch[k]), k
    storages = {packed[k].untyped_storage().data_ptr() for k in ("ids", "mask", "x")}
    assert len(storages) == 1 and packed["ids"].is_shared()


@pytest.mark.parametrize("partitions", [0, 6])
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_a_different_world_size(tmp_path, shards, new_world, partitions):
    """Saved at step 3 on 2 ranks, resumed on 1 or 3: the same global batches, no repeat, no gap (global order,
    and the partitioned order with 6 partitions)."""
    cfg = data_config(tmp_path, train_urls=shards["urls"], partitions=partitions)
    g = 12
    full = _global_batches([build_train_loader(cfg, r, 2, g) for r in range(2)])
    before = [build_train_loader(cfg, r, 2, g) for r in range(2)]
    head_per_rank = [epoch_keys(ld, limit=3) for ld in before]
    states = [ld.state_dict() for ld in before]
    assert states[0]["samples_consumed"] == states[1]["samples_consumed"] == 3 * g
    head = [head_per_rank[0][b] + head_per_rank[1][b] for b in range(3)]
    after = [build_train_loader(cfg, r, new_world, g) for r in range(new_world)]
    for ld in after:
        ld.load_state_dict(states[0])
    tail = _global_batches(after)
    assert head + tail == full
    keys = sum(head + tail, [])
    assert len(keys) == len(set(keys)) == N


def _shard(key: str) -> int:
    return int(key.removeprefix("sample")) // PER_SHARD


def test_partitioned_order_each_rank_reads_only_its_shards(tmp_path, shards):
    """6 partitions, global batch 12: the global batches are the same on 1, 2 and 3 ranks; on W ranks each rank
    reads 6/W whole shards (its partitions) and no other rank reads them; each epoch deals the shards anew."""
    cfg = data_config(tmp_path, train_urls=shards["urls"], partitions=6)
    by_world = {}
    for w in (1, 2, 3):
        loaders = [build_train_loader(cfg, r, w, 12) for r in range(w)]
        by_world[w] = _global_batches(loaders)
        per_rank = [
            {_shard(k) for b in epoch_keys(ld) for k in b} for ld in loaders
        ]  # epoch 1 (epoch 0 above)
        assert sorted(s for p in per_rank for s in p) == list(range(N // PER_SHARD))  # disjoint, complete
        assert all(len(p) == 6 // w for p in per_rank)
    assert by_world[1] == by_world[2] == by_world[3]
    batches = by_world[1]
    assert sorted(sum(batches, [])) == shards["keys"] and all(len(b) == 12 for b in batches)
    # global batch b = partitions 0..5, 2 samples each, every partition one shard
    assert all(len({_shard(k) for k in b[2 * p : 2 * p + 2]}) == 1 for b in batches for p in range(6))
    assert len({_shard(k) for b in batches for k in b}) == 6


def test_partitioned_order_refuses_world_sizes_and_batches(tmp_path, shards):
    cfg = data_config(tmp_path, train_urls=shards["urls"], partitions=6)
    with pytest.raises(
        Exception, match=r"world size 4 does not divide data.partitions=6: valid world sizes are 1, 2, 3, 6"
    ):
        build_train_loader(cfg, 0, 4, 12)
    with pytest.raises(Exception, match=r"data.partitions: 6 does not divide the global batch 8"):
        build_train_loader(cfg, 0, 2, 8)
    many = data_config(tmp_path, train_urls=shards["urls"], partitions=12)
    with pytest.raises(Exception, match=r"12 partitions need at least as many shards; .* has 6"):
        build_train_loader(many, 0, 1, 12)
    state = build_train_loader(cfg, 0, 1, 12).state_dict()
    with pytest.raises(Exception, match="partitions was 6, now 0"):
        build_train_loader(data_config(tmp_path, train_urls=shards["urls"]), 0, 1, 12).load_state_dict(state)
    # G/P samples of each partition per batch: another global batch is another sequence, never silently resumed
    with pytest.raises(DataError, match="saved with global batch 12, now 24: with data.partitions=6"):
        build_train_loader(cfg, 0, 1, 24).load_state_dict(state)


def test_partitioned_order_balances_uneven_shards():
    """Shards of different sizes are dealt out by sample count; the epoch ends at the shortest partition."""
    from mmt.data.indexed import assign_partitions, partitioned_order

    counts = np.array([30, 5, 5, 5, 5, 10, 10, 10, 20])
    parts = assign_partitions(counts, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(9))
    assert sorted(int(counts[p].sum()) for p in parts) == [30, 35, 35]
    order = partitioned_order(counts, 0, 0, 3, 4, shard_window=2)
    assert len(order) == 7 * 12 and len(set(order.tolist())) == len(order)  # 30 // 4 = 7 batches


def test_order_quality_tells_partitioned_windows_from_a_full_permutation():
    """The shuffle figures the README quotes: a global batch of the partitioned order with one-shard windows
    draws from exactly P shards (one per partition), the full permutation from nearly all; same-shard pairs
    sit at 1 / shards for the permutation; a sorted order correlates fully with storage and with itself."""
    from mmt.data.indexed import partitioned_order
    from mmt.data.order_quality import order_quality

    counts = np.full(32, 96, dtype=np.int64)  # 96 = 12 per-partition batches of 8: no batch straddles shards
    full = order_quality(counts, epoch_order(counts, 0, 0), epoch_order(counts, 0, 1), 64)
    part = order_quality(
        counts,
        partitioned_order(counts, 0, 0, 8, 8, True, 1),
        partitioned_order(counts, 0, 1, 8, 8, True, 1),
        64,
    )
    assert full.distinct_shards_per_batch > 25 and part.distinct_shards_per_batch == 8.0
    assert abs(full.same_shard_pair_rate - 1 / 32) < 0.005
    assert part.same_shard_pair_rate == pytest.approx(8 * 8 * 7 / (64 * 63))  # 8 samples of each of 8 shards
    assert abs(full.storage_correlation) < 0.05 and abs(full.epoch_correlation) < 0.05
    ordered = np.arange(32 * 96, dtype=np.int64)
    same = order_quality(counts, ordered, ordered, 64)
    assert same.storage_correlation == pytest.approx(1.0) and same.epoch_correlation == pytest.approx(1.0)


def test_resume_rejects_other_data(tmp_path, shards):
    cfg = data_config(tmp_path, train_urls=shards["urls"])
    state = build_train_loader(cfg, 0, 1, 8).state_dict()
    other = data_config(tmp_path, train_urls=shards["urls"], seed=5)
    with pytest.raises(Exception, match="seed was 0, now 5"):
        build_train_loader(other, 0, 1, 8).load_state_dict(state)


def test_eval_loader_splits_without_loss(tmp_path, shards):
    cfg = data_config(tmp_path, val_urls=shards["urls"], train_urls=shards["urls"])
    keys = [k for r in range(3) for k in sum(epoch_keys(build_eval_loader(cfg, r, 3, 10)), [])]
    assert sorted(keys) == shards["keys"]
    first = build_eval_loader(cfg, 0, 1, 10)
    a, b = next(iter(first)), next(iter(first))
    torch.testing.assert_close(a["image_features"], b["image_features"])  # no augmentation at eval


def test_streaming_split_is_disjoint_and_complete():
    urls = [f"s{i}" for i in range(11)]
    parts = [split_shards(urls, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(sum(parts, [])) == sorted(urls)


def test_streaming_loader_epoch_covers_all(tmp_path, shards):
    """webdataset streaming: 2 ranks x 2 workers read disjoint shards; together every sample once."""
    cfg = data_config(
        tmp_path, train_urls=shards["urls"], loader="streaming", num_workers=2, shuffle_buffer=20
    )
    keys = [k for r in range(2) for k in sum(epoch_keys(build_train_loader(cfg, r, 2, 8)), [])]
    assert sorted(keys) == shards["keys"]  # 16 per shard, 8 per batch: no partial batch dropped
    resampled = data_config(tmp_path, train_urls=shards["urls"], loader="streaming", resampled=True)
    loader = build_train_loader(resampled, 0, 1, 8)
    assert len(epoch_keys(loader, limit=20)) == 20  # more than one epoch's worth: it never ends


def test_streaming_resumes_mid_epoch_exactly(tmp_path, shards):
    """Streaming, 2 workers, shuffle buffer: stopped after 3 batches and resumed on the same layout, the rest of
    the epoch (keys and augmented tensors) and the next epoch are the uninterrupted ones; another world size or
    worker count is refused with a message naming the indexed loader."""
    cfg = data_config(
        tmp_path, train_urls=shards["urls"], loader="streaming", num_workers=2, shuffle_buffer=20
    )
    uninterrupted = build_train_loader(cfg, 1, 2, 8)
    full = [(b["keys"], b["image_features"]) for b in uninterrupted]
    full_next = epoch_keys(uninterrupted)
    first = build_train_loader(cfg, 1, 2, 8)
    head = epoch_keys(first, limit=3)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_consumed"] == 3
    resumed = build_train_loader(cfg, 1, 2, 8)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the trainer may call this: it keeps the resumed position
    tail = [(b["keys"], b["image_features"]) for b in resumed]
    assert head + [k for k, _ in tail] == [k for k, _ in full] and len(tail) == len(full) - 3
    torch.testing.assert_close(tail[0][1], full[3][1], rtol=0, atol=0)  # same augmentation
    assert resumed.epoch == 1 and epoch_keys(resumed) == full_next
    for other in (
        build_train_loader(cfg, 0, 1, 8),
        build_train_loader(
            data_config(
                tmp_path, train_urls=shards["urls"], loader="streaming", num_workers=0, shuffle_buffer=20
            ),
            1,
            2,
            8,
        ),
    ):
        with pytest.raises(DataError, match=r"data.loader=indexed .*any world size"):
            other.load_state_dict(state)


def test_streaming_weighted_mixing(tmp_path):
    from mmt.config.data import DataSourceConfig

    a = write_synthetic_shards(str(tmp_path / "a"), 64, 16, seed=1, key_prefix="a")
    b = write_synthetic_shards(str(tmp_path / "b"), 64, 16, seed=2, key_prefix="b")
    cfg = data_config(tmp_path, loader="streaming", resampled=True, shuffle_buffer=0)
    cfg.data.sources = [
        DataSourceConfig(urls=a["urls"], weight=3.0),
        DataSourceConfig(urls=b["urls"], weight=1.0),
    ]
    keys = sum(epoch_keys(build_train_loader(cfg, 0, 1, 20), limit=20), [])
    from_a = sum(k.startswith("a") for k in keys)
    assert len(keys) == 400 and 255 < from_a < 345  # 3:1 -> 300 expected (binomial sd ~8.7)


def test_shards_from_webdataset_shardwriter_and_plain_tar(tmp_path):
    """Shards written by webdataset's ShardWriter and by tarfile in img2dataset layout load unchanged."""
    rng = np.random.default_rng(0)
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=10, verbose=0) as sink:
        for i in range(25):
            img = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
            sink.write({"__key__": f"w{i:03d}", "jpg": img, "txt": f"caption {i}", "json": {"i": i}})
    img2 = tmp_path / "img2dataset-00000.tar"
    with tarfile.open(img2, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(12):
            key = f"00000{i:04d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 50, 3), dtype=np.uint8)).save(buf, "JPEG")
            meta = {
                "url": f"http://example/{i}.jpg",
                "caption": f"photo {i}",
                "key": key,
                "status": "success",
            }
            for ext, data in (
                ("jpg", buf.getvalue()),
                ("txt", f"photo {i}".encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    urls = f"{tmp_path}/wds-{{000000..000002}}.tar::{img2}"
    for loader in ("indexed", "streaming"):
        cfg = data_config(tmp_path, train_urls=urls, val_urls=urls, loader=loader, shuffle=False)
        batches = (
            list(build_eval_loader(cfg, 0, 1, 5))
            if loader == "indexed"
            else list(build_train_loader(cfg, 0, 1, 1))
        )
        keys = sorted(k for b in batches for k in b["keys"])
        assert keys == sorted([f"w{i:03d}" for i in range(25)] + [f"00000{i:04d}" for i in range(12)])
        for b in batches:
            assert b["image_present"].all() and b["text_present"].all() and not b["audio_present"].any()
            assert (b["audio_features"] == 0).all() and not b["audio_attention_mask"].any()


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()  # with end-of-archive zero blocks: the parser stops at them, as tarfile does


def test_sample_ranges_split_without_tarfile_like_tarfile(shards):
    """The reader's header parser (`split_plain`) gives tarfile's members for plain ustar ranges (mmt's, GNU tar's),
    hands everything else to tarfile (PAX long names, links), and refuses what tarfile's path refuses."""
    from mmt.data.shards import _split_with_tarfile
    from mmt.data.tarindex import scan_file
    from mmt.data.tarmembers import split_plain

    path = str(shards["dir"] / "shard-000000.tar")
    data = open(path, "rb").read()
    for s in scan_file(path).samples:
        members = split_plain(data[s.start : s.end], s.key, 2**20)
        assert members == _split_with_tarfile(data[s.start : s.end], s.key, 2**20)
        assert set(members) == {"jpg", "json", "txt", "wav"}
    gnu = _tar_bytes([("k1.jpg", b"x" * 700), ("k1.txt", b"hi")], tarfile.GNU_FORMAT)
    assert split_plain(gnu, "k1", 0) == {"jpg": b"x" * 700, "txt": b"hi"}
    long_key = "d" * 120 + "/k2"
    pax = _tar_bytes([(long_key + ".txt", b"a"), (long_key + ".json", b"{}")])
    assert split_plain(pax, long_key, 0) is None  # PAX header: tarfile's turn
    assert _split_with_tarfile(pax, long_key, 0) == {"txt": b"a", "json": b"{}"}
    for members, key, problem in (
        ([("../k3.txt", b"a")], "../k3", "absolute or '..' path"),
        ([("k4.txt", b"a" * 100)], "k4", "more than data.max_member_mb"),
        ([("k5.txt", b"a"), ("k6.txt", b"b")], "k5", "does not belong to sample 'k5'"),
    ):
        with pytest.raises(ValueError, match=problem):
            split_plain(_tar_bytes(members), key, 50)
    with pytest.raises(ValueError, match="runs past the indexed range"):
        split_plain(gnu[:1000], "k1", 0)


def test_wav_fast_path_equals_soundfile():
    """Mono 16-bit PCM wav is decoded with numpy; the values are libsndfile's exactly, other audio goes to it."""
    import soundfile as sf

    from mmt.data import media

    def reference(data: bytes) -> np.ndarray:
        wav, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return wav.mean(axis=1).astype(np.float32)

    pcm = np.array([-32768, -32767, -1, 0, 1, 12345, 32767], dtype=np.int16)
    for channels, fmt, subtype, fast in (
        (1, "WAV", "PCM_16", True),
        (2, "WAV", "PCM_16", False),
        (1, "WAV", "PCM_24", False),
        (1, "FLAC", "PCM_16", False),
    ):
        buf = io.BytesIO()
        sf.write(buf, np.stack([pcm] * channels, 1), 16000, format=fmt, subtype=subtype)
        data = buf.getvalue()
        assert (media._plain_pcm16_wav(data) is not None) == fast
        wav, rate = media.decode_audio(data)
        assert rate == 16000 and wav.dtype == np.float32 and np.array_equal(wav, reference(data))
