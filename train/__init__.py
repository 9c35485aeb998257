"""From text to trained SAEs: data, harvesting, the activation cache and the trainer."""

from train.cache import ActivationCache, load_cache


def __getattr__(name: str):
    if name == "fit":  # imported on use: the trainer pulls in transformers via the harvester
        from train.trainer import fit

        return fit
    raise AttributeError(f"module 'train' has no attribute {name!r}")


__all__ = ["ActivationCache", "fit", "load_cache"]
