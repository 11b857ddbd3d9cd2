"""The demo's no-learning reference: nearest class centroid on raw pixels and raw audio spectra.

The digits are easy on raw pixels; a trained model's zero-shot accuracy is printed next to this so a reader can
tell whether the contrastive embedding learned more than the pixels already give.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mmt.data import media, storage
from mmt.data.shards import iter_tar_samples


def _features(urls: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    imgs, specs, labels = [], [], []
    for url in storage.expand(urls):
        with storage.open_read(url) as f:
            for s in iter_tar_samples(f, url):
                labels.append(int(json.loads(s["json"])["label"]))
                imgs.append(np.asarray(media.decode_image(s["jpg"]), dtype=np.float32).ravel() / 255.0)
                wav, _ = media.decode_audio(s["wav"])
                specs.append(np.abs(np.fft.rfft(wav)).astype(np.float32))
    n = min(map(len, specs))
    return {"image": np.stack(imgs), "audio": np.stack([x[:n] for x in specs])}, np.asarray(labels)


def nearest_centroid_accuracy(info: dict[str, Any]) -> dict[str, float]:
    """Held-out accuracy per modality of a nearest-class-centroid classifier fitted on the training split."""
    train, y_train = _features(info["train_urls"])
    val, y_val = _features(info["val_urls"])
    out = {}
    for m in ("image", "audio"):
        classes = np.unique(y_train)
        centroids = np.stack([train[m][y_train == c].mean(0) for c in classes])
        n = min(centroids.shape[1], val[m].shape[1])
        d = ((val[m][:, None, :n] - centroids[None, :, :n]) ** 2).sum(-1)
        out[m] = float((classes[d.argmin(1)] == y_val).mean())
    return out
