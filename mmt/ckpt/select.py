"""Which tensors make up one tower, for exporting or loading a single encoder on its own.

A tower is what turns one modality into its contrastive embedding: ``encoders.<m>`` (the transformer and its
input embedding), ``pools.<m>`` (sequence -> vector) and ``contrastive.proj.<m>`` (vector -> shared space). Names
keep their full model path, so the exported file loads into a full model (``load_pretrained(..., only=[m])``).
"""

from __future__ import annotations

from collections.abc import Iterable

MODALITIES = ("text", "image", "audio")
TOWER_PREFIXES = ("encoders.{m}.", "pools.{m}.", "contrastive.proj.{m}.")


def prefixes_for(only: Iterable[str]) -> list[str]:
    """A modality name expands to its tower's prefixes; anything else is taken as a name prefix itself."""
    out: list[str] = []
    for item in only:
        if item in MODALITIES:
            out += [p.format(m=item) for p in TOWER_PREFIXES]
        else:
            out.append(item)
    return out


def select_names(names: Iterable[str], only: Iterable[str] | None) -> list[str]:
    names = list(names)
    if not only:
        return names
    prefixes = prefixes_for(only)
    picked = [n for n in names if any(n.startswith(p) or n == p.rstrip(".") for p in prefixes)]
    if not picked:
        raise ValueError(f"--only {','.join(only)}: no tensor matches (prefixes {prefixes})")
    return picked
