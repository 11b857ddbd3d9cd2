"""Image and audio decoding / encoding shared by the shard builder and the loader (Pillow, soundfile, numpy)."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
from PIL import Image

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")


# Images come from untrusted shards: a header claiming more pixels than this is refused before decoding (a
# decompression bomb: a few KB that would decode to GBs). Pillow's own guard only raises at twice its limit.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _check_pixels(img: Image.Image) -> None:
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image of {img.width}x{img.height} pixels, more than {MAX_IMAGE_PIXELS:,}: a decompression bomb?"
        )


def open_image(data: bytes) -> Image.Image:
    """Decode fully (``verify`` + ``load``) so a truncated or corrupt file fails here, not later; RGB out."""
    with Image.open(io.BytesIO(data)) as probe:
        _check_pixels(probe)
        probe.verify()
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
    return img


def decode_image(data: bytes) -> Image.Image:
    """Fast path for the loader: one decode (a corrupt or truncated file raises here too), RGB out."""
    img = Image.open(io.BytesIO(data))
    _check_pixels(img)  # from the header, before any pixel is decoded
    if img.mode == "RGB":
        img.load()
        return img
    return open_image(data)


def resize_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """img2dataset's resize modes: ``keep_ratio`` (shorter side = size), ``center_crop`` (then crop to a square),
    ``border`` (longer side = size, padded to a square with black), ``no``."""
    if mode == "no" or size <= 0:
        return img
    w, h = img.size
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(w, h)
    elif mode == "border":
        scale = size / max(w, h)
    else:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if mode == "center_crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return img


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def image_format_ext(data: bytes) -> str:
    """The canonical extension (``jpg``, ``png``, ...) of encoded image bytes, from their header."""
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """(mono float32 waveform in [-1, 1], sample rate) from wav / flac / ogg bytes."""
    plain = _plain_pcm16_wav(data)
    if plain is not None:
        wav, sr = plain
    else:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        wav = wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1).astype(np.float32)
    if wav.shape[0] == 0:
        raise ValueError("audio has no samples")
    return wav, int(sr)


def _plain_pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """A mono 16-bit PCM wav (what the shard builder writes) decoded with numpy, else None (soundfile decodes).

    Why: soundfile's open / read / close round trip through its virtual-file callbacks was ~80 us a sample, more
    than the decoding itself; this is ~5 us. The values are libsndfile's exactly: ``int16 * 2**-15``.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            if size < 16 or body + 16 > len(data):
                return None
            fmt = struct.unpack_from("<HHIIHH", data, body)
        elif chunk == b"data":
            if fmt is None or body + size > len(data) or size % 2:
                return None
            tag, channels, rate, _, align, bits = fmt
            if tag != 1 or channels != 1 or bits != 16 or align != 2 or rate <= 0:
                return None
            pcm = np.frombuffer(data, dtype="<i2", count=size // 2, offset=body)
            return pcm.astype(np.float32) * np.float32(2.0**-15), rate
        pos = body + size + (size & 1)
    return None


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain (truncate or zero-pad the spectrum)."""
    if sr_in == sr_out or wav.size == 0:
        return wav.astype(np.float32, copy=False)
    n_out = max(1, int(round(wav.size * sr_out / sr_in)))
    spec = np.fft.rfft(wav.astype(np.float64))
    out = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    m = min(spec.size, out.size)
    out[:m] = spec[:m]
    return (np.fft.irfft(out, n=n_out) * (n_out / wav.size)).astype(np.float32)


def encode_audio(wav: np.ndarray, sr: int, fmt: str = "wav") -> bytes:
    """16-bit PCM wav or flac."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), sr, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()
