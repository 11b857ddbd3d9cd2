"""What turns a stored sample into the model's tensors for a config: the per-sample decoder and the collator.

The data loaders (`mmt.data.loader`), the annotation-file datasets (`mmt.data.annotations`) and inference
(`mmt.inference.Preprocess`) all decode through `build_codec`, so a sample reaches the model identically whichever
way it is read.
"""

from __future__ import annotations

from mmt.config import ConfigError
from mmt.config.root import Config
from mmt.config.tasks import task_spec
from mmt.data import storage
from mmt.data.samples import CollateSpec, Collator, SampleDecoder
from mmt.data.schema import ANSWERS_NAME
from mmt.data.shards import StorageSettings, load_answer_vocab
from mmt.data.streaming import Source
from mmt.data.transforms import AudioTransform, ImageTransform
from mmt.text import build_tokenizer

SOURCE = "config"


def train_sources(cfg: Config) -> list[Source]:
    if cfg.data.sources:
        return [Source(storage.expand(s.urls), s.weight) for s in cfg.data.sources]
    if not cfg.data.train_urls:
        raise ConfigError(
            SOURCE, "data.train_urls", "no training shards (set data.train_urls or data.sources)"
        )
    return [Source(storage.expand(cfg.data.train_urls))]


def answer_vocab(cfg: Config, settings: StorageSettings) -> list[str]:
    """The VQA vocabulary: ``data.answer_vocab``, else ``answers.json`` beside the first training shard."""
    path = cfg.data.answer_vocab
    if not path:
        first = train_sources(cfg)[0].urls[0]
        path = storage.join(storage.dirname(first), ANSWERS_NAME)
    try:
        vocab = load_answer_vocab(path, settings)
    except (OSError, ValueError) as e:
        raise ConfigError(
            SOURCE, "data.answer_vocab", f"cannot read the VQA answer vocabulary {path}: {e}"
        ) from e
    if cfg.model.heads.vqa_answers != len(vocab):
        raise ConfigError(
            SOURCE,
            "model.heads.vqa_answers",
            f"is {cfg.model.heads.vqa_answers} but the answer vocabulary {path} has {len(vocab)} answers",
        )
    return vocab


def build_codec(
    cfg: Config, train: bool, settings: StorageSettings | None, vocab: list[str] | None = None
) -> tuple[SampleDecoder, Collator]:
    """The per-sample decoder and the batch collator for ``cfg.train.task`` and the model's towers (``vocab``:
    the VQA answers, else read as `answer_vocab` says)."""
    m, task = cfg.model, cfg.train.task
    modalities = tuple(m.modalities())
    for name in modalities:
        if getattr(m, name).input == "features":
            raise ConfigError(
                SOURCE, f"model.{name}.input", "precomputed features are not produced by mmt.data"
            )
    tokenizer, text_len = None, 0
    if m.text is not None:
        tokenizer = build_tokenizer(m.text.tokenizer)
        text_len = cfg.data.text_max_len or m.text.max_len
        if task_spec(task).text_len_from_decoder and m.decoder is not None:
            text_len = min(text_len, m.decoder.max_len)
    image = audio = None
    image_shape: tuple[int, int, int] = (3, 1, 1)
    audio_len, audio_mels = 1, 0
    if m.image is not None:
        if m.image.channels != len(cfg.data.image.mean):
            raise ConfigError(
                SOURCE, "data.image.mean", f"needs {m.image.channels} entries (model.image.channels)"
            )
        image = ImageTransform(m.image.image_size, cfg.data.image, train)
        image_shape = (m.image.channels, m.image.image_size, m.image.image_size)
    if m.audio is not None:
        spec = (m.audio.n_fft, m.audio.hop_length, m.audio.n_mels) if m.audio.input == "spectrogram" else None
        audio = AudioTransform(m.audio.sample_rate, m.audio.max_seconds, cfg.data.audio, train, spec)
        audio_len = audio.max_samples
        if spec is not None:
            audio_len, audio_mels = audio_len // m.audio.hop_length + 1, m.audio.n_mels
    if task_spec(task).answer_targets and vocab is None:
        vocab = answer_vocab(cfg, settings)  # type: ignore[arg-type]
    elif not task_spec(task).answer_targets:
        vocab = None
    decoder = SampleDecoder(
        task,
        modalities,
        train=train,
        tokenizer=tokenizer,
        text_max_len=text_len,
        caption_choice=cfg.data.caption_choice,
        image=image,
        audio=audio,
        answer_vocab=vocab,
    )
    collate = Collator(
        CollateSpec(
            task=task,
            modalities=modalities,
            pad_id=tokenizer.pad_id if tokenizer is not None else 0,
            image_shape=image_shape,
            audio_len=audio_len,
            audio_mels=audio_mels,
            num_answers=len(vocab or []),
        )
    )
    return decoder, collate
