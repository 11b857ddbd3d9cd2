"""Typed configuration of the data pipeline: the `data.*` section.

Two loaders read the same WebDataset tar shards (see `mmt.data.loader`):

* ``indexed`` (default): a map-style reader over per-shard byte-offset indexes. Its epoch order is a permutation
  of (seed, epoch), each rank takes its slice of every global batch, and its state is (epoch, samples consumed),
  so a run resumes exactly, without repeats or gaps, on the same or on a different world size.
* ``streaming``: the plain webdataset pipeline (shard shuffle, shuffle buffer, resampled / infinite mode, weighted
  mixing of several sources); resume restarts at an epoch boundary with fresh randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmt.config.errors import ConfigError
from mmt.config.fields import cfg_field


@dataclass
class DataSourceConfig:
    """One training source for weighted mixing: its shards and its sampling weight."""

    urls: str = cfg_field("", doc="brace-expanded shard URLs of this source")
    weight: float = cfg_field(1.0, doc="relative sampling probability (streaming loader)", gt=0)


@dataclass
class ImageDataConfig:
    """Image decoding and augmentation; the output side is `model.image.image_size`."""

    mean: list[float] = cfg_field(
        default_factory=lambda: [0.48145466, 0.4578275, 0.40821073],
        doc="per-channel mean subtracted (CLIP's)",
    )
    std: list[float] = cfg_field(
        default_factory=lambda: [0.26862954, 0.26130258, 0.27577711],
        doc="per-channel std divided by (CLIP's)",
    )
    crop_scale_min: float = cfg_field(
        0.9, doc="train: random-resized-crop area fraction lower bound (1.0: no random crop)", gt=0, le=1
    )
    crop_ratio_max: float = cfg_field(
        1.1, doc="train: random-resized-crop aspect ratio range [1/x, x] (1.0: square crops)", ge=1
    )
    hflip: float = cfg_field(0.0, doc="train: horizontal flip probability (0 for text or digits)", ge=0, le=1)
    color_jitter: float = cfg_field(0.0, doc="train: brightness/contrast jitter strength", ge=0, le=1)


@dataclass
class AudioDataConfig:
    """Audio decoding and augmentation; rate and clip length come from `model.audio`."""

    random_crop: bool = cfg_field(True, doc="train: crop clips longer than model.audio.max_seconds at random")
    gain_db: float = cfg_field(0.0, doc="train: random gain in [-x, +x] dB", ge=0)


@dataclass
class DataConfig:
    train_urls: str = cfg_field(
        "", doc="training shards: brace-expanded local paths or fsspec URLs (s3://...)"
    )
    val_urls: str = cfg_field("", doc="held-out shards for evaluation")
    num_workers: int = cfg_field(2, doc="DataLoader workers per rank", ge=0)
    sources: list[DataSourceConfig] = cfg_field(
        default_factory=list,
        doc="several weighted training sources (instead of train_urls; weights: streaming)",
    )
    format: str = cfg_field(
        "shards",
        doc="shards: train_urls / val_urls are WebDataset tars; annotations: each is one JSON / JSONL annotation "
        "file (mmt shards build field names) with media paths relative to it or to media_root",
        choices=("shards", "annotations"),
    )
    media_root: str = cfg_field(
        "", doc="annotations: folder the media paths are relative to ('': the file's)"
    )
    loader: str = cfg_field(
        "indexed",
        doc="indexed: exact resume on any world size; streaming: webdataset pipeline (resampled, mixing)",
        choices=("indexed", "streaming"),
    )
    seed: int | None = cfg_field(None, doc="data order seed (None: train.seed)")
    shuffle: bool = cfg_field(True, doc="shuffle training samples (a permutation per epoch)")
    shard_window: int = cfg_field(
        0,
        doc="indexed: 0 shuffles all samples; k > 0 permutes shards and shuffles samples within windows of k "
        "shards, so only k shards are read at a time (locality for object stores)",
        ge=0,
    )
    partitions: int = cfg_field(
        0,
        doc="indexed: 0 orders all samples globally (every rank reads every shard); P > 0 deals shards out to P "
        "canonical partitions per epoch, global batch = G/P samples of each, so each node reads only its "
        "partitions' shards (world sizes: divisors of P; P must divide the global batch)",
        ge=0,
    )
    remote_read: str = cfg_field(
        "shard",
        doc="indexed, remote shards: shard fetches whole shards into the node cache; range reads each sample "
        "with one HTTP range request (no cache: small random-access jobs, eval, debugging)",
        choices=("shard", "range"),
    )
    readahead_shards: int = cfg_field(
        0,
        doc="indexed with partitions, remote shards: shards downloaded ahead of the reading per rank "
        "(0: one window per partition of the rank)",
        ge=0,
    )
    shuffle_buffer: int = cfg_field(1000, doc="streaming: sample shuffle buffer", ge=0)
    resampled: bool = cfg_field(False, doc="streaming: draw shards with replacement forever (pretraining)")
    prefetch_factor: int = cfg_field(2, doc="batches prefetched per worker", ge=1)
    persistent_workers: bool = cfg_field(True, doc="keep workers alive across epochs")
    start_method: str = cfg_field(
        "forkserver",
        doc="worker start method (s3fs is not fork-safe)",
        choices=("forkserver", "spawn", "fork"),
    )
    cache_dir: str = cfg_field(
        "",
        doc="node-local cache of remote shards and computed indexes ('' : $MMT_DATA_CACHE or a temp folder)",
    )
    cache_max_gb: float = cfg_field(
        0.0,
        doc="node cache cap (0: keep all); with partitions, shards are evicted only after their last read this "
        "epoch; a cap below what the shards read at once need is refused (the error names the minimum)",
        ge=0,
    )
    endpoint_url: str = cfg_field("", doc="S3-compatible endpoint ('' : AWS_ENDPOINT_URL, else AWS)")
    retries: int = cfg_field(4, doc="retries of a failed remote read (exponential backoff)", ge=0)
    retry_backoff_s: float = cfg_field(0.5, doc="first retry delay in seconds (doubles each retry)", ge=0)
    max_failure_fraction: float = cfg_field(
        0.01, doc="unreadable samples (or shards) allowed, as a fraction, before the job fails", ge=0, le=1
    )
    failure_check_after: int = cfg_field(
        200,
        doc="samples read before the failure fraction is enforced (it is always enforced at epoch end)",
        ge=1,
    )
    max_member_mb: float = cfg_field(
        256.0,
        doc="a sample with a tar member larger than this (MiB) is skipped and counted, never read into memory "
        "(0: no limit)",
        ge=0,
    )
    text_max_len: int = cfg_field(0, doc="token limit (0: model.text.max_len)", ge=0)
    caption_choice: str = cfg_field(
        "random",
        doc="train: which caption of several to use (eval always the first)",
        choices=("random", "first"),
    )
    answer_vocab: str = cfg_field(
        "", doc="VQA answer vocabulary JSON ('' : answers.json beside the first training shard)"
    )
    image: ImageDataConfig = field(default_factory=ImageDataConfig)
    audio: AudioDataConfig = field(default_factory=AudioDataConfig)

    def check(self, source: str, prefix: str) -> None:
        if self.train_urls and self.sources:
            raise ConfigError(
                source, f"{prefix}sources", "give either data.train_urls or data.sources, not both"
            )
        for i, s in enumerate(self.sources):
            if not s.urls:
                raise ConfigError(source, f"{prefix}sources.{i}.urls", "empty")
            if s.weight <= 0:
                raise ConfigError(source, f"{prefix}sources.{i}.weight", f"{s.weight!r} must be > 0")
        if len(self.image.mean) != len(self.image.std):
            raise ConfigError(source, f"{prefix}image.std", "must have as many entries as data.image.mean")
        if any(s <= 0 for s in self.image.std):
            raise ConfigError(source, f"{prefix}image.std", "entries must be > 0")
