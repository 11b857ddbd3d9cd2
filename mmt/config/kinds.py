"""The names each model registry implements, declared in the config layer.

A config is checked against these without importing the model code (``mmt slurm`` and ``mmt train``'s config
check stay free of torch), and the model layer is the one that depends on them: `mmt.model.registry` refuses to
register a name missing here, and the registry sweep test fails for a name here that no class implements. A new
variant is its class plus its name here (and its settings, if any, in the matching config dataclass).
"""

from __future__ import annotations

KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("mha", "sparse", "strided", "linear", "performer", "reformer"),
    "positional": ("learned", "sinusoidal", "rotary", "relative", "none"),
    "ffn": ("standard", "glu", "swiglu"),
    "norm": ("layernorm", "rmsnorm", "scalenorm"),
    "fusion": ("concat", "sum", "gated", "tensor", "bottleneck", "cross_attention"),
    "pooling": ("attention", "mean", "first"),
}
