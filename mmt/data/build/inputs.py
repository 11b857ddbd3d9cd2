"""Read builder inputs into `InputRecord`s: a folder of files, a CSV, or a JSON / JSONL manifest.

Column / field names follow what common datasets use (``image``, ``image_path``, ``file_name``, ``caption``,
``captions``, ``question``, ``answers``, ``audio``, ``id`` ...). Relative paths are resolved against the
manifest's folder (or ``root``). Records keep their input order, which fixes the shard order.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mmt.data.schema import AUDIO_EXTS, IMAGE_EXTS, make_key, split_member

INPUT_FORMATS = ("auto", "folder", "csv", "json", "jsonl")
IMAGE_FIELDS = ("image", "image_path", "img", "filepath", "file_path", "file_name", "filename", "path", "jpg")
CAPTION_FIELDS = ("captions", "caption", "text", "title", "sentences", "txt")
AUDIO_FIELDS = ("audio", "audio_path", "audio_file", "wav", "flac", "sound")
KEY_FIELDS = ("key", "id", "sample_id", "uid", "image_id", "question_id")
QUESTION_FIELDS = ("question", "q")
ANSWER_FIELDS = ("answers", "answer", "multiple_choice_answer")


class InputError(ValueError):
    """The input file itself cannot be read (one bad record is a reported failure, not this)."""


@dataclass
class InputRecord:
    key: str
    source: str  # what to name in the failure report: file path or "manifest.jsonl:17"
    image: str | None = None
    audio: str | None = None
    captions: list[str] = field(default_factory=list)
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        return "folder"
    ext = path.rsplit(".", 1)[-1].lower()
    if ext in ("csv", "tsv"):
        return "csv"
    if ext in ("jsonl", "ndjson"):
        return "jsonl"
    if ext == "json":
        return "json"
    raise InputError(f"{path}: cannot tell the input format from the name; pass --format")


def read_inputs(path: str, fmt: str = "auto", root: str | None = None) -> list[InputRecord]:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    fmt = detect_format(path) if fmt == "auto" else fmt
    base = root or (path if fmt == "folder" else os.path.dirname(os.path.abspath(path)))
    if fmt == "folder":
        records = _read_folder(path)
    elif fmt == "csv":
        records = _read_csv(path, base)
    elif fmt == "json":
        records = _read_json(path, base)
    elif fmt == "jsonl":
        records = _read_jsonl(path, base)
    else:
        raise InputError(f"input format {fmt!r} is not one of {INPUT_FORMATS}")
    return _dedupe_keys(records)


def _dedupe_keys(records: list[InputRecord]) -> list[InputRecord]:
    seen: dict[str, int] = defaultdict(int)
    for r in records:
        n = seen[r.key]
        seen[r.key] += 1
        if n:
            r.key = f"{r.key}_{n}"
    return records


def _pick(item: dict[str, Any], names: tuple[str, ...]) -> Any:
    for n in names:
        if n in item and item[n] not in (None, ""):
            return item[n]
    return None


def _as_list(value: Any, split_bar: bool = False) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return _as_list(json.loads(text))
            except json.JSONDecodeError:
                pass
        parts = text.split("|") if split_bar else [text]
        return [p.strip() for p in parts if p.strip()]
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, dict):  # VQA style {"answer": "yes", ...} or COCO {"raw": ...}
                v = _pick(v, ("answer", "raw", "caption", "text"))
            if v is not None and str(v).strip():
                out.append(str(v).strip())
        return out
    return [str(value)]


def _resolve(path: Any, base: str) -> str | None:
    if path is None:
        return None
    path = str(path)
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.join(base, path)


def _from_item(item: dict[str, Any], base: str, source: str, position: int) -> InputRecord:
    image = _resolve(_pick(item, IMAGE_FIELDS), base)
    audio = _resolve(_pick(item, AUDIO_FIELDS), base)
    raw_key = _pick(item, KEY_FIELDS)
    if raw_key is None:
        media = image or audio
        raw_key = os.path.splitext(os.path.basename(media))[0] if media else f"{position:09d}"
    used = set(IMAGE_FIELDS + CAPTION_FIELDS + AUDIO_FIELDS + QUESTION_FIELDS + ANSWER_FIELDS)
    extra = {k: v for k, v in item.items() if k not in used and isinstance(v, (str, int, float, bool))}
    question = _pick(item, QUESTION_FIELDS)
    return InputRecord(
        key=make_key(str(raw_key)),
        source=source,
        image=image,
        audio=audio,
        captions=_as_list(_pick(item, CAPTION_FIELDS)),
        question=str(question).strip() if question is not None else None,
        answers=_as_list(_pick(item, ANSWER_FIELDS), split_bar=True),
        extra=extra,
    )


def _read_csv(path: str, base: str) -> list[InputRecord]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read CSV: {e}") from e
    return [_from_item(row, base, f"{path}:{i + 2}", i) for i, row in enumerate(rows)]


def _read_json(path: str, base: str) -> list[InputRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON: {e}") from e
    if isinstance(data, dict):
        for name in ("samples", "data", "annotations", "items", "images", "questions"):
            if isinstance(data.get(name), list):
                data = data[name]
                break
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of samples (or a dict with a 'samples' list)")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InputError(f"{path}: entry {i} is a {type(item).__name__}, expected an object")
        out.append(_from_item(item, base, f"{path}[{i}]", i))
    return out


def _read_jsonl(path: str, base: str) -> list[InputRecord]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read JSONL: {e}") from e
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i + 1}: not JSON: {e}") from e
        if not isinstance(item, dict):
            raise InputError(f"{path}:{i + 1}: expected an object")
        out.append(_from_item(item, base, f"{path}:{i + 1}", i))
    return out


def _read_folder(folder: str) -> list[InputRecord]:
    """Files grouped by relative path up to the first dot: ``a/x.jpg`` + ``a/x.txt`` + ``a/x.json`` + ``a/x.wav``."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            parts = split_member(rel)
            if parts is not None:
                groups[parts[0]][parts[1]] = os.path.join(dirpath, name)
    records = []
    for stem in sorted(groups):
        files = groups[stem]
        meta: dict[str, Any] = {}
        if "json" in files:
            try:
                with open(files["json"], encoding="utf-8") as f:
                    loaded = json.load(f)
                meta = loaded if isinstance(loaded, dict) else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                meta = {"__error__": f"{files['json']}: {e}"}
        rec = _from_item(
            {k: v for k, v in meta.items() if k not in IMAGE_FIELDS + AUDIO_FIELDS}, folder, "", 0
        )
        rec.key = make_key(stem)
        rec.source = os.path.join(folder, stem)
        rec.image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        rec.audio = next((files[e] for e in AUDIO_EXTS if e in files), None)
        if "txt" in files:
            try:
                with open(files["txt"], encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
                rec.captions = lines + [c for c in rec.captions if c not in lines]
            except (OSError, UnicodeDecodeError) as e:
                rec.extra["__error__"] = f"{files['txt']}: {e}"
        if "__error__" in meta:
            rec.extra["__error__"] = meta["__error__"]
        records.append(rec)
    return records
