"""Datasets over an annotation file (JSON / JSONL) and a media folder: the design documents' dataset classes.

A record is read with the same field names as ``mmt shards build`` (`mmt.data.build.inputs`) and turned into the
same members a shard would hold (`mmt.data.build.process.process_record` with the default options), then decoded
by the loader's `SampleDecoder`: a sample read here and the same sample read from shards built from this file
are identical. `AnnotationCatalog` / `AnnotationReader` stand in for the shard catalog and reader, so
``data.format=annotations`` trains through the indexed loader unchanged (same order, exact resume).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mmt.config.model import MultiModalConfig
from mmt.config.root import Config
from mmt.data.build.inputs import InputRecord, read_inputs
from mmt.data.build.process import ProcessOptions, process_record
from mmt.data.codec import build_codec
from mmt.data.indexed import _seed_words
from mmt.model.factory import load_model_config


def read_records(path: str, media_root: str = "") -> list[InputRecord]:
    """The records of a JSON / JSONL annotation file; media paths relative to ``media_root`` or the file."""
    return read_inputs(path, "auto", media_root or None)


@dataclass
class AnnotationCatalog:
    """The shard catalog's interface over one annotation file (one "shard" holding every record)."""

    urls: list[str]
    keys: list[list[str]]
    records: list[InputRecord] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str, media_root: str = "") -> AnnotationCatalog:
        records = read_records(path, media_root)
        return cls(urls=[path], keys=[[r.key for r in records]], records=records)

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(k) for k in self.keys], dtype=np.int64)

    @property
    def sizes(self) -> list[int]:
        return [os.path.getsize(u) for u in self.urls]

    @property
    def num_samples(self) -> int:
        return int(sum(len(k) for k in self.keys))

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(f"{os.path.basename(self.urls[0])}:{self.num_samples};".encode())
        for k in self.keys[0]:
            h.update(k.encode())
        return h.hexdigest()[:16]


class AnnotationReader:
    """``read(0, i)`` -> (key, members) like `SampleReader`; a broken record raises (the loader reports it)."""

    def __init__(self, catalog: AnnotationCatalog, task: str = "auto") -> None:
        self.records, self.opts = catalog.records, ProcessOptions(task=task)

    def read(self, shard: int, pos: int) -> tuple[str, dict[str, bytes]]:
        rec = self.records[pos]
        out = process_record(rec, self.opts)
        if out.sample is None:
            raise ValueError(f"{rec.source}: {out.error}")
        return rec.key, {k: v for k, v in out.sample.items() if k != "__key__"}


class AnnotationDataset(Dataset):
    """Map-style: ``dataset[i]`` is the decoded sample dict of the shard decoder (``key``, ``text``, ``image``,
    ``audio``, ``answer_targets``, ``label`` as present); ``dataset.collate`` batches them like the loader.

    ``config``: a run `Config` (its model and data settings), a `MultiModalConfig`, or a shipped model name /
    config file. ``train=True`` applies the training augmentation, seeded per (``seed``, ``epoch``, index).
    """

    task = "retrieval"

    def __init__(
        self,
        annotations: str | os.PathLike,
        media_root: str | os.PathLike = "",
        *,
        config: Config | MultiModalConfig | str = "tiny_tri",
        train: bool = False,
        seed: int = 0,
        answer_vocab: Sequence[str] | None = None,
    ) -> None:
        if isinstance(config, Config):
            cfg = Config(model=config.model, data=config.data, train=config.train)
        else:
            model = config if isinstance(config, MultiModalConfig) else load_model_config(config)
            cfg = Config(model=model)
        cfg.train.task = self.task
        self._vocab = list(answer_vocab or [])
        self.catalog = AnnotationCatalog.open(str(annotations), str(media_root))
        self.reader = AnnotationReader(self.catalog, "auto")
        self.decoder, self.collate = build_codec(cfg, train, None, vocab=self._vocab or None)
        self.seed, self.epoch, self._seed_words = seed, 0, _seed_words

    def __len__(self) -> int:
        return self.catalog.num_samples

    def raw(self, index: int) -> tuple[str, dict[str, bytes]]:
        """The members a shard built from this file holds for record ``index``."""
        return self.reader.read(0, index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, raw = self.raw(index)
        rng = np.random.default_rng(self._seed_words(self.seed, self.epoch, index))
        return self.decoder(key, raw, rng)


class ImageTextDataset(AnnotationDataset):
    """Image (and audio) + captions: contrastive retrieval."""

    task = "retrieval"


class CaptioningDataset(AnnotationDataset):
    """Image + captions as decoder targets."""

    task = "captioning"


class VQADataset(AnnotationDataset):
    """Image + question + answers (``answer_targets`` over ``answer_vocab``, soft VQA scores)."""

    task = "vqa"
