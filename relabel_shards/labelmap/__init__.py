"""The label-map record: encode, decode and validate one image's top-k label map; the only code that knows
the byte layout (this package).

A record holds ``values[k, h, w]`` (raw logits) and ``indices[k, h, w]`` (class indices) of one image and
``num_classes``. It is a 32-byte little-endian header (magic, version, codecs, k, h, w, palette size,
num_classes, quantization step, payload size, CRC-32), in format version 2 optionally an image binding
(:class:`ImageBinding`: the size and sha256 of the image file and the width and height that were annotated,
48 bytes), then one zstandard frame. ``docs/FORMAT.md`` specifies every byte. Encodings (a closed table,
:data:`ENCODINGS`):

- ``"compact"`` (default): a palette of the classes present, each element a reference to the previous
  cell's ranks or a palette position; values quantized to a fixed step (0.01 logit) and coded as a 2-D
  prediction residual of the top-1 plane plus the gaps down the ranks. 2,204 bytes per 5x15x15 record on
  real maps (the official ``torch.save`` file: 9,353), pooled targets within 9.9e-4 of the float32 map's
  (``benchmarks/bench_labelmap.py``).
- ``"float16"``: the same indices plus float16 values (2,908 bytes, pooled error 7.4e-4).
- ``"lossless"``: the same indices plus float32 values, bit-exact (4,719 bytes).

Decoding checks every size before it allocates (the decompressed size is fixed by the header and must match
the zstd frame's declared content size), verifies the CRC-32, and never unpickles. Every bad record raises
:class:`LabelMapError`, whose message says what is wrong and reads well after a "shard X key Y: " prefix.

Modules: ``_header`` (constants, types, the header's checks), ``_codec`` (the payload's sections, both
directions, and the decoder's tuning tables), ``_encode`` and ``_decode``. Import from here.
"""

from __future__ import annotations

from relabel_shards.labelmap._codec import _decode_indices as _decode_indices
from relabel_shards.labelmap._codec import _decode_quantized as _decode_quantized
from relabel_shards.labelmap._codec import _neighbour_refs as _neighbour_refs
from relabel_shards.labelmap._codec import _planes as _planes
from relabel_shards.labelmap._codec import _pred2d as _pred2d
from relabel_shards.labelmap._codec import _ref_pointers as _ref_pointers
from relabel_shards.labelmap._codec import _resolve_refs as _resolve_refs
from relabel_shards.labelmap._codec import _unplanes as _unplanes
from relabel_shards.labelmap._codec import _unzigzag as _unzigzag
from relabel_shards.labelmap._codec import _zigzag as _zigzag
from relabel_shards.labelmap._decode import _zstd_frame_end as _zstd_frame_end
from relabel_shards.labelmap._decode import decode_label_map
from relabel_shards.labelmap._encode import TAR_FIT_STEP, encode_label_map
from relabel_shards.labelmap._header import (
    DEFAULT_LEVEL,
    ENCODINGS,
    HEADER,
    HEADER_SIZE,
    INDEX_CODECS,
    MAGIC,
    MAX_ABS_Q,
    MAX_CLASSES,
    MAX_DIM,
    MAX_ELEMENTS,
    MAX_STEP,
    VALUE_CODECS,
    VERSION,
    VERSIONS,
    ImageBinding,
    LabelMap,
    LabelMapError,
    LabelMapHeader,
    read_header,
)
from relabel_shards.labelmap._header import _bytes_view as _bytes_view
from relabel_shards.labelmap._header import _parse_header as _parse_header
from relabel_shards.labelmap._header import _ref_width as _ref_width
from relabel_shards.labelmap._header import _sizes as _sizes

# The decoder's tables and thresholds (_TABLES, _TABLE_MAX, _BLAS_MAX, _FLOAT_EXACT, _SMALL_K, ...) are
# deliberately not re-exported: rebinding a copy here would not reach the code that reads them. Patch them
# on relabel_shards.labelmap._codec.

# Tracebacks and pickles name the public path, as before the split into modules.
LabelMapError.__module__ = __name__
ImageBinding.__module__ = __name__

__all__ = [
    "DEFAULT_LEVEL",
    "ENCODINGS",
    "HEADER",
    "HEADER_SIZE",
    "INDEX_CODECS",
    "MAGIC",
    "MAX_ABS_Q",
    "MAX_CLASSES",
    "MAX_DIM",
    "MAX_ELEMENTS",
    "TAR_FIT_STEP",
    "MAX_STEP",
    "VALUE_CODECS",
    "VERSION",
    "VERSIONS",
    "ImageBinding",
    "LabelMap",
    "LabelMapError",
    "LabelMapHeader",
    "decode_label_map",
    "encode_label_map",
    "read_header",
]
