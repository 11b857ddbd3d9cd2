"""Turn one `InputRecord` into one shard sample: validate, optionally resize / re-encode, assemble the members.

Runs in builder worker processes; it never raises for bad input -- it returns the error text so the build goes
on and the report lists the record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mmt.config.tasks import TASK_SPECS
from mmt.data import media
from mmt.data.build.inputs import InputRecord
from mmt.data.schema import normalize_answer

# --task: what a record must hold and which media are kept. The training tasks' entries come from their
# `TaskSpec`; ``audio-text`` (audio + caption, image dropped) and ``auto`` (whatever a record has) are the
# builder's own.
_BUILD_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{s.name: (s.shard_needs, s.shard_media) for s in TASK_SPECS.values()},
    "audio-text": (("audio", "caption"), ("audio",)),
    "auto": ((), ("image", "audio")),
}
TASKS = tuple(_BUILD_TASKS)


@dataclass(frozen=True)
class ProcessOptions:
    task: str = "auto"
    image_size: int = 0
    resize_mode: str = "keep_ratio"
    reencode: bool = False
    image_format: str = "jpg"
    jpeg_quality: int = 95
    min_image_size: int = 1
    audio_rate: int = 0
    audio_format: str = "keep"
    max_audio_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in _BUILD_TASKS:
            raise ValueError(f"task {self.task!r} is not one of {list(_BUILD_TASKS)}")


@dataclass
class Processed:
    key: str
    source: str
    sample: dict[str, bytes] | None = None
    error: str | None = None
    modalities: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()


def assemble_sample(
    key: str,
    *,
    image: tuple[str, bytes] | None = None,
    audio: tuple[str, bytes] | None = None,
    captions: list[str] | None = None,
    question: str | None = None,
    answers: list[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """The img2dataset layout: ``KEY.jpg`` / ``KEY.txt`` (first caption) / ``KEY.json`` / ``KEY.wav``."""
    sample: dict[str, Any] = {"__key__": key}
    info: dict[str, Any] = {"key": key}
    if image is not None:
        sample[image[0]] = image[1]
    if audio is not None:
        sample[audio[0]] = audio[1]
    if captions:
        sample["txt"] = captions[0].encode("utf-8")
        info["caption"] = captions[0]
        info["captions"] = list(captions)
    if question is not None:
        info["question"] = question
        info["answers"] = list(answers or [])
    info.update(meta or {})
    sample["json"] = json.dumps(info, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sample


def _read(path: str) -> bytes:
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _image(path: str, opts: ProcessOptions, meta: dict[str, Any]) -> tuple[str, bytes]:
    data = _read(path)
    img = media.open_image(data)
    w, h = img.size
    if min(w, h) < opts.min_image_size:
        raise ValueError(f"image is {w}x{h}, smaller than --min-image-size {opts.min_image_size}")
    meta.update(original_width=w, original_height=h)
    ext = media.image_format_ext(data)
    if opts.image_size > 0 and opts.resize_mode != "no":
        img = media.resize_image(img, opts.image_size, opts.resize_mode)
        data, ext = media.encode_image(img, opts.image_format, opts.jpeg_quality), opts.image_format
    elif opts.reencode or ext not in ("jpg", "png", "webp"):
        data, ext = media.encode_image(img, opts.image_format, opts.jpeg_quality), opts.image_format
    meta.update(width=img.size[0], height=img.size[1])
    return ("jpg" if ext == "jpeg" else ext), data


def _audio(path: str, opts: ProcessOptions, meta: dict[str, Any]) -> tuple[str, bytes]:
    data = _read(path)
    wav, sr = media.decode_audio(data)
    meta.update(original_sample_rate=sr)
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    changed = False
    if opts.max_audio_seconds > 0 and wav.size > opts.max_audio_seconds * sr:
        wav, changed = wav[: int(opts.max_audio_seconds * sr)], True
    if opts.audio_rate > 0 and opts.audio_rate != sr:
        wav, sr, changed = media.resample(wav, sr, opts.audio_rate), opts.audio_rate, True
    fmt = ext if opts.audio_format == "keep" else opts.audio_format
    if fmt not in ("wav", "flac"):
        fmt, changed = "flac", True
    if changed or fmt != ext:
        data, ext = media.encode_audio(wav, sr, fmt), fmt
    meta.update(sample_rate=sr, duration=round(wav.size / sr, 4))
    return ext, data


def _missing(rec: InputRecord, task: str) -> str | None:
    need = _BUILD_TASKS[task][0]
    have = {
        "image": rec.image is not None,
        "audio": rec.audio is not None,
        "caption": bool(rec.captions),
        "question": bool(rec.question),
        "answers": bool(rec.answers),
    }
    if task == "auto" and not (have["image"] or have["audio"] or have["caption"]):
        return "no image, audio or caption"
    lacking = [n for n in need if not have[n]]
    return f"task {task} needs {', '.join(lacking)}" if lacking else None


def process_record(rec: InputRecord, opts: ProcessOptions) -> Processed:
    out = Processed(rec.key, rec.source)
    try:
        if "__error__" in rec.extra:
            raise ValueError(rec.extra["__error__"])
        missing = _missing(rec, opts.task)
        if missing:
            raise ValueError(missing)
        meta = {k: v for k, v in rec.extra.items() if not k.startswith("__")}
        image = audio = None
        media_kept = _BUILD_TASKS[opts.task][1]
        use_image = rec.image is not None and "image" in media_kept
        use_audio = rec.audio is not None and "audio" in media_kept
        if use_image:
            try:
                image = _image(rec.image, opts, meta)
            except Exception as e:
                raise ValueError(f"image {rec.image}: {type(e).__name__}: {e}") from e
        if use_audio:
            try:
                audio = _audio(rec.audio, opts, meta)
            except Exception as e:
                raise ValueError(f"audio {rec.audio}: {type(e).__name__}: {e}") from e
        answers = [normalize_answer(a) for a in rec.answers] if rec.question else []
        out.sample = assemble_sample(
            rec.key,
            image=image,
            audio=audio,
            captions=rec.captions,
            question=rec.question,
            answers=answers,
            meta=meta,
        )
        out.modalities = tuple(
            m for m, ok in (("image", image), ("text", rec.captions), ("audio", audio)) if ok
        ) + (("vqa",) if rec.question else ())
        out.answers = tuple(answers)
    except Exception as e:  # a bad record is reported, never fatal
        out.error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
    return out
