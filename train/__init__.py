"""From text to trained SAEs: data, harvesting, the activation cache and the trainer."""

from train.cache import ActivationCache, load_cache

__all__ = ["ActivationCache", "load_cache"]
