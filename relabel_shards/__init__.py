"""relabel-shards: ReLabel-style localized soft targets, stored beside the JPEGs in WebDataset shards.

The public API, each name imported on first use so that ``import relabel_shards`` stays light
(no torch, timm or triton until a name that needs them is touched):

Label-map record (``relabel_shards.labelmap``)
    ``LabelMap``, ``LabelMapError``, ``encode_label_map``, ``decode_label_map``
LabelPooling (``relabel_shards.pooling``)
    ``label_pooling``, ``LabelPooling``, ``reference_label_pooling``
Annotator and batch job (``relabel_shards.annotator``, ``relabel_shards.build``)
    ``create_annotator``, ``build_shards``
Shards (``relabel_shards.shards``)
    ``ShardError``, ``read_info``
Object storage errors (``relabel_shards.storage``)
    ``StorageError``, ``StorageTimeoutError``
Crop geometry and the streaming loader (``relabel_shards.crops``, ``relabel_shards.loader``)
    ``random_resized_crop_params``, ``ReLabelDataset``, ``make_loader``
Import of the official release (``relabel_shards.convert``)
    ``convert_official``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it. The one place that says what the public API is.
_EXPORTS: dict[str, str] = {
    "LabelMap": "relabel_shards.labelmap",
    "LabelMapError": "relabel_shards.labelmap",
    "encode_label_map": "relabel_shards.labelmap",
    "decode_label_map": "relabel_shards.labelmap",
    "label_pooling": "relabel_shards.pooling",
    "LabelPooling": "relabel_shards.pooling",
    "reference_label_pooling": "relabel_shards.pooling",
    "create_annotator": "relabel_shards.annotator",
    "build_shards": "relabel_shards.build",
    "ShardError": "relabel_shards.shards",
    "read_info": "relabel_shards.shards",
    "StorageError": "relabel_shards.storage",
    "StorageTimeoutError": "relabel_shards.storage",
    "random_resized_crop_params": "relabel_shards.crops",
    "ReLabelDataset": "relabel_shards.loader",
    "make_loader": "relabel_shards.loader",
    "convert_official": "relabel_shards.convert",
}

__all__ = [
    "__version__",
    "LabelMap",
    "LabelMapError",
    "encode_label_map",
    "decode_label_map",
    "label_pooling",
    "LabelPooling",
    "reference_label_pooling",
    "create_annotator",
    "build_shards",
    "ShardError",
    "read_info",
    "StorageError",
    "StorageTimeoutError",
    "random_resized_crop_params",
    "ReLabelDataset",
    "make_loader",
    "convert_official",
]
assert set(__all__) == {"__version__", *_EXPORTS}, "__all__ and _EXPORTS must name the same API"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'relabel_shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static tools see the real names
    from relabel_shards.annotator import create_annotator
    from relabel_shards.build import build_shards
    from relabel_shards.convert import convert_official
    from relabel_shards.crops import random_resized_crop_params
    from relabel_shards.labelmap import LabelMap, LabelMapError, decode_label_map, encode_label_map
    from relabel_shards.loader import ReLabelDataset, make_loader
    from relabel_shards.pooling import LabelPooling, label_pooling, reference_label_pooling
    from relabel_shards.shards import ShardError, read_info
    from relabel_shards.storage import StorageError, StorageTimeoutError
