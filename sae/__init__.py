"""sae-forge's dictionary library: create, load, save and use sparse autoencoders.

The names below are imported on first use (PEP 562), so that `sae --help`, whose module lives in
this package, does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sae.environment import check_versions

check_versions()

if TYPE_CHECKING:
    from sae.models import SAE

_LAZY = {
    "ConfigError": "sae.config",
    "SAEConfig": "sae.config",
    "load": "sae.hub",
    "FormatError": "sae.io",
    "PickleRefused": "sae.io",
    "REGISTRY": "sae.models",
    "SAE": "sae.models",
}


def __getattr__(name: str) -> Any:
    if name == "ARCHITECTURES":
        return tuple(__getattr__("REGISTRY"))
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae' has no attribute {name!r}")


def create(architecture: str = "topk", **fields) -> SAE:
    """A freshly initialised SAE; any SAEConfig field is a keyword (d_in, d_sae, k, hook_name, ...)."""
    from sae.config import SAEConfig
    from sae.models import REGISTRY

    cfg = SAEConfig(architecture=architecture, **fields)
    return REGISTRY[cfg.architecture](cfg)


__all__ = [
    "ARCHITECTURES",
    "SAE",
    "ConfigError",
    "FormatError",
    "PickleRefused",
    "SAEConfig",
    "create",
    "load",
]
