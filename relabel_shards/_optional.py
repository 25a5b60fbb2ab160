"""Optional and heavy imports with an install hint when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> what to install to get it
_HINTS = {
    "s3fs": "pip install 'relabel-shards[s3]'",
    "gcsfs": "pip install 'relabel-shards[gcs]'",
    "triton": "pip install triton (it ships with CUDA builds of torch on Linux)",
    "skimage": "pip install scikit-image",
    "moto": "pip install 'relabel-shards[dev]'",
    "huggingface_hub": "pip install 'relabel-shards[hf]'",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` naming ``purpose`` and the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = _HINTS.get(module.split(".")[0], f"pip install {module.split('.')[0]}")
        raise ImportError(f"{purpose} needs the '{module}' package: {hint}") from e
