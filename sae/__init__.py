"""sae-forge's dictionary library: create, load, save and use sparse autoencoders."""

from sae.config import ConfigError, SAEConfig
from sae.hub import load
from sae.io import FormatError, PickleRefused
from sae.models import REGISTRY, SAE

ARCHITECTURES = tuple(REGISTRY)


def create(architecture: str = "topk", **fields) -> SAE:
    """A freshly initialised SAE; any SAEConfig field is a keyword (d_in, d_sae, k, hook_name, ...)."""
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
