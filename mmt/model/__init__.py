"""The multimodal transformer library: every variant is chosen by name through a registry.

The modules whose decorators fill the registries (`mmt.model.registry`) are imported here, so a registry is
complete whenever any part of the model package has been imported.
"""

from mmt.model import attention, ffn, fusion, norms, pooling, positional  # noqa: F401  (they fill the registries)
