"""relabel-shards: ReLabel-style localized soft targets, stored beside the JPEGs in WebDataset shards.

The public API, each name imported on first use so that ``import relabel_shards`` stays light
(no torch, timm or triton until a name that needs them is touched):

Label-map record (``relabel_shards.labelmap``)
    ``LabelMap``, ``LabelMapError``, ``encode_label_map``, ``decode_label_map``, ``ImageBinding``
LabelPooling (``relabel_shards.pooling``)
    ``label_pooling``, ``LabelPooling``, ``reference_label_pooling``, ``SparseTargets``
Soft-target losses without dense targets (``relabel_shards.losses``)
    ``soft_target_cross_entropy``, ``token_labeling_loss``
Annotator and batch job (``relabel_shards.annotator``, ``relabel_shards.build``)
    ``create_annotator``, ``build_shards``
Shards (``relabel_shards.shards``)
    ``ShardError``, ``read_info``
Object storage errors (``relabel_shards.storage``)
    ``StorageError``, ``StorageTimeoutError``
Crop geometry and the streaming loader (``relabel_shards.crops``, ``relabel_shards.loader``)
    ``random_resized_crop_params``, ``ReLabelDataset``, ``make_loader``, ``merge_state_dicts``
Import of the official release (``relabel_shards.convert``)
    ``convert_official``, ``convert_official_labels``
Label shards beside image shards (``relabel_shards.join``, ``.pairing``, ``.publish``)
    ``join_labels``, ``key_digest``, ``check_pairs_with``, ``publish``
Classes per batch (``relabel_shards.diversity``)
    ``class_sorted_warning``
Opening images and the sample transform (``relabel_shards.images``, ``relabel_shards.transforms``)
    ``open_image``, ``ImageError``, ``RandomResizedCropFlip``, ``CenterCrop``, ``Compose``, ``Lighting``
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
    "ImageBinding": "relabel_shards.labelmap",
    "label_pooling": "relabel_shards.pooling",
    "LabelPooling": "relabel_shards.pooling",
    "reference_label_pooling": "relabel_shards.pooling",
    "SparseTargets": "relabel_shards.pooling",
    "soft_target_cross_entropy": "relabel_shards.losses",
    "token_labeling_loss": "relabel_shards.losses",
    "create_annotator": "relabel_shards.annotator",
    "build_shards": "relabel_shards.build",
    "ShardError": "relabel_shards.shards",
    "read_info": "relabel_shards.shards",
    "StorageError": "relabel_shards.storage",
    "StorageTimeoutError": "relabel_shards.storage",
    "random_resized_crop_params": "relabel_shards.crops",
    "ReLabelDataset": "relabel_shards.loader",
    "make_loader": "relabel_shards.loader",
    "merge_state_dicts": "relabel_shards.loader",
    "convert_official": "relabel_shards.convert",
    "convert_official_labels": "relabel_shards.convert",
    "join_labels": "relabel_shards.join",
    "key_digest": "relabel_shards.pairing",
    "check_pairs_with": "relabel_shards.pairing",
    "publish": "relabel_shards.publish",
    "class_sorted_warning": "relabel_shards.diversity",
    "open_image": "relabel_shards.images",
    "ImageError": "relabel_shards.images",
    "RandomResizedCropFlip": "relabel_shards.transforms",
    "CenterCrop": "relabel_shards.transforms",
    "Compose": "relabel_shards.transforms",
    "Lighting": "relabel_shards.transforms",
}

__all__ = [
    "__version__",
    "LabelMap",
    "LabelMapError",
    "encode_label_map",
    "decode_label_map",
    "ImageBinding",
    "label_pooling",
    "LabelPooling",
    "reference_label_pooling",
    "SparseTargets",
    "soft_target_cross_entropy",
    "token_labeling_loss",
    "create_annotator",
    "build_shards",
    "ShardError",
    "read_info",
    "StorageError",
    "StorageTimeoutError",
    "random_resized_crop_params",
    "ReLabelDataset",
    "make_loader",
    "merge_state_dicts",
    "convert_official",
    "convert_official_labels",
    "join_labels",
    "key_digest",
    "check_pairs_with",
    "publish",
    "class_sorted_warning",
    "open_image",
    "ImageError",
    "RandomResizedCropFlip",
    "CenterCrop",
    "Compose",
    "Lighting",
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
    from relabel_shards.convert import convert_official, convert_official_labels
    from relabel_shards.crops import random_resized_crop_params
    from relabel_shards.diversity import class_sorted_warning
    from relabel_shards.images import ImageError, open_image
    from relabel_shards.join import join_labels
    from relabel_shards.labelmap import (
        ImageBinding,
        LabelMap,
        LabelMapError,
        decode_label_map,
        encode_label_map,
    )
    from relabel_shards.loader import ReLabelDataset, make_loader, merge_state_dicts
    from relabel_shards.losses import soft_target_cross_entropy, token_labeling_loss
    from relabel_shards.pairing import check_pairs_with, key_digest
    from relabel_shards.pooling import LabelPooling, SparseTargets, label_pooling, reference_label_pooling
    from relabel_shards.publish import publish
    from relabel_shards.shards import ShardError, read_info
    from relabel_shards.storage import StorageError, StorageTimeoutError
    from relabel_shards.transforms import CenterCrop, Compose, Lighting, RandomResizedCropFlip
