"""Options of the train/ stages as dataclasses: the `sae` CLI is generated from these, and YAML
config files use the same names. Kept free of heavy imports so `sae --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass, field

CACHE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class HarvestConfig:
    """Run the model over a text dataset and store activations at one or more hookpoints."""

    model: str = "smollm2-135m"
    """Model: smollm2-135m (embedded), all-minilm-l6-v2 (embedded), an HF id or a local folder."""
    dataset: str = "shakespeare"
    """Text: shakespeare (embedded), a local text file or folder, or a `datasets` name."""
    hook: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    """Hookpoints to capture in the same forward pass (repeat the flag for several)."""
    tokens: int = 1_000_000
    """Rows (tokens, BOS excluded) to harvest; stops early, with a note, if the dataset ends."""
    out: str = "runs/demo/cache"
    """Cache directory: a local path or an fsspec URL such as s3://bucket/prefix."""
    batch_size: int = 8
    """Windows per forward pass."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    dtype: str = "bfloat16"
    """Forward precision (autocast) and the cache's dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    pack: bool = True
    """Pack documents across window boundaries; --no-pack starts each document in a new window."""
    seed: int = 0
    """Seed of the window order."""
    shard_windows: int = 256
    """Windows per shard (a multiple of batch_size); a restarted harvest resumes at a shard boundary."""
    split: str = "train"
    """Split, for `datasets` datasets."""
    text_column: str = "text"
    """Text column, for `datasets` datasets."""

    def __post_init__(self) -> None:
        if not self.hook:
            raise ValueError("at least one --hook is needed")
        for name in ("tokens", "batch_size", "context_size", "shard_windows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shard_windows % self.batch_size:
            raise ValueError(
                f"shard_windows={self.shard_windows} must be a multiple of batch_size={self.batch_size}"
            )
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {CACHE_DTYPES}")
