"""SAEConfig: everything needed to rebuild a dictionary, and nothing about how it was trained.
An SAE predicts its own input; a transcoder predicts another hookpoint from it (same config)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
NORMALIZATIONS = ("none", "expected_average_only_in")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid SAE; the message names the field."""


@dataclass
class SAEConfig:
    """Shape, activation rule and provenance of one sparse autoencoder.

    Field names follow SAELens where SAELens has the same notion, so that a cfg.json written by
    either library reads naturally in the other.
    """

    architecture: str = "topk"
    """One of the registered architectures: standard, topk, batchtopk, jumprelu, gated,
    matryoshka_batchtopk (SAELens's names)."""
    d_in: int = 576
    """Width of the activations the SAE reads (576 for SmolLM2-135M's residual stream)."""
    d_sae: int = 4608
    """Number of latents."""
    k: int = 32
    """Active latents per row for topk; the average per row for batchtopk and matryoshka."""
    matryoshka_widths: list[int] = field(default_factory=list)
    """Nested prefix sizes for matryoshka_batchtopk, increasing and ending at d_sae; empty means
    four prefixes doubling up to d_sae."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (the decoder bias as the data's centre)."""
    normalize_activations: str = "none"
    """'none', or 'expected_average_only_in': inputs are scaled by norm_scaling_factor so that
    their mean norm is sqrt(d_in); the factor is folded into the weights when saving."""
    norm_scaling_factor: float = 1.0
    """The input scale used with expected_average_only_in."""
    hook_name: str = "blocks.6.hook_resid_post"
    """Hookpoint the SAE reads, in TransformerLens style, or a raw module path."""
    hook_name_out: str = ""
    """Hookpoint the dictionary predicts; "" is hook_name (an SAE). A transcoder reads the MLP's
    input (`blocks.L.mlp.hook_in`) and predicts its output (`blocks.L.hook_mlp_out`)."""
    d_out: int = 0
    """Width of what the dictionary predicts; 0 is d_in."""
    skip: bool = False
    """A linear skip path W_skip [d_out, d_in] from input to output (a skip transcoder)."""
    norm_scaling_factor_out: float = 1.0
    """The output scale used with expected_average_only_in (a transcoder's target; an SAE's
    output takes norm_scaling_factor)."""
    model_name: str = "smollm2-135m"
    """Model the activations came from (a name sae.lm knows, an HF id or a local path)."""
    model_revision: str = ""
    """Its revision (a hub branch, tag or commit, or a checkpoint's folder); empty: as named."""
    context_size: int = 128
    """Token window length the activations were taken from."""
    prepend_bos: bool = True
    """Whether each window started with BOS."""
    dataset_path: str = "shakespeare"
    """Text the activations came from."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16, float16 or float64."""
    device: str = "cpu"
    """Device the parameters live on."""

    def __post_init__(self) -> None:
        from sae.models import REGISTRY  # the one list of architectures lives beside the classes

        if self.architecture not in REGISTRY:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; expected one of {sorted(REGISTRY)}"
            )
        self.hook_name_out = self.hook_name_out or self.hook_name
        self.d_out = self.d_out or self.d_in
        for name in ("d_in", "d_sae", "k", "d_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise ConfigError(
                f"a transcoder ({self.hook_name} -> {self.hook_name_out}) cannot centre its input "
                "by b_dec, its output bias: set apply_b_dec_to_input=False (b_enc absorbs a centre)"
            )
        if self.k > self.d_sae:
            raise ConfigError(f"k={self.k} is larger than d_sae={self.d_sae}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize_activations {self.normalize_activations!r} is not one of {NORMALIZATIONS}"
            )
        for name in ("norm_scaling_factor", "norm_scaling_factor_out"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        widths = self.matryoshka_widths
        if widths and (
            sorted(set(widths)) != list(widths) or widths[-1] != self.d_sae or widths[0] <= 0
        ):
            raise ConfigError(
                f"matryoshka_widths must increase strictly and end at d_sae={self.d_sae}, got {widths}"
            )

    @property
    def is_transcoder(self) -> bool:
        """Whether it predicts something other than its input (another hookpoint, or a skip)."""
        return self.hook_name_out != self.hook_name or self.d_out != self.d_in or self.skip

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SAEConfig:
        """Build from a dict, checking each known key's type; unknown keys are an error so that a
        misspelt field does not silently fall back to its default."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: unknown SAEConfig keys {unknown}; known keys are {sorted(known)}"
            )
        values = {}
        for key, value in data.items():
            default = (
                known[key].default_factory()
                if known[key].default is MISSING
                else known[key].default
            )
            expected = type(default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{source}: {key} should be {expected.__name__}, got {type(value).__name__} {value!r}"
                )
            values[key] = value
        return cls(**values)
