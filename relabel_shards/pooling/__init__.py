"""LabelPooling: crop boxes + top-k label maps -> soft targets ``[B, C]`` (or ``[B, oh, ow, C]`` per token),
without building the dense map.

``label_pooling`` (function), ``LabelPooling`` (``nn.Module``) and ``reference_label_pooling`` (the dense
oracle, for tests and benchmarks). Modules: ``reference.py`` (oracle), ``torch_impl.py`` (sparse exact PyTorch
path), ``triton_impl.py`` (fused kernel, imported only when used), ``op.py`` (the
``relabel_shards::label_pooling`` op), ``official.py`` (the official ReLabel code, for comparisons),
``demo.py`` (the ``relabel-shards pool`` demo), ``sparse.py`` (``SparseTargets``, targets on their
support). Importing this package does not import triton.
"""

from relabel_shards.pooling.api import LabelPooling, label_pooling
from relabel_shards.pooling.reference import reference_label_pooling
from relabel_shards.pooling.sparse import SparseTargets

__all__ = ["LabelPooling", "SparseTargets", "label_pooling", "reference_label_pooling"]
