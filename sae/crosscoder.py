"""Acausal crosscoders (Lindsey et al. 2024, "Sparse Crosscoders"): one dictionary over several
hookpoints at once, usually the residual stream at several layers. The encoder reads them side by
side and each latent has one decoder direction per hookpoint, so a feature that persists across
layers is one latent rather than one per layer.

It is an SAE of the concatenation ([..., n * d]) with one scale per hookpoint: any sae.models rule,
with its training recipe (its sparse kernels, AuxK, Matryoshka's prefixes), is the crosscoder's.
Shapes, n hookpoints of width d, F latents:

    z       = part.encode(x * s)               x = [x_1 | ... | x_n], s = [s_1 | ... | s_n]
    x_hat_i = part.decode(z)[block i] / s_i    W_dec_i = W_dec[:, block i]: latent's direction at i

One departure from the paper: the standard (L1) rule weighs a code by the norm of its whole
decoder row, sqrt(sum_i |W_dec_i|^2), where the paper sums the per-hookpoint norms sum_i |W_dec_i|
(docs/decisions.md 48).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from sae.config import ConfigError, SAEConfig
from sae.layered import LayeredDictionary, LayersConfig
from sae.models import REGISTRY, SAE, LossOutput, TrainContext

KIND = "crosscoder"


@dataclass
class CrosscoderConfig(LayersConfig):
    """Shape, rule and provenance of one crosscoder over `hook_names`."""

    matryoshka_widths: list[int] = field(default_factory=list)
    """As SAEConfig's, for matryoshka_batchtopk (empty: four doubling prefixes)."""

    kind: ClassVar[str] = KIND

    def __post_init__(self) -> None:
        if len(set(self.hook_names)) != len(self.hook_names) or self.n_layers < 2:
            raise ConfigError(
                f"a crosscoder reads two or more distinct hookpoints; got {self.hook_names}"
            )
        super().__post_init__()
        self.part()  # the rule and its fields, checked by SAEConfig

    @property
    def is_transcoder(self) -> bool:
        return False

    @property
    def total_latents(self) -> int:
        return self.d_sae

    def part(self) -> SAEConfig:
        """The SAE of the concatenation (the scales are the crosscoder's)."""
        return SAEConfig(
            architecture=self.architecture, d_in=self.n_layers * self.d_in, d_sae=self.d_sae,
            k=self.k, matryoshka_widths=list(self.matryoshka_widths),
            hook_name="+".join(self.hook_names), model_name=self.model_name, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip


class Crosscoder(LayeredDictionary):
    kind = KIND
    config = CrosscoderConfig

    def __init__(self, cfg: CrosscoderConfig, latents: range | None = None):
        """`latents`: only these of the d_sae latents (a latent shard's slice, as SAE's)."""
        super().__init__()
        self.cfg = cfg
        self.sae = REGISTRY[cfg.architecture](cfg.part(), latents)

    @property
    def parts(self) -> list[SAE]:
        return [self.sae]

    def latent_dim(self, name: str) -> int | None:
        """As SAE.latent_dim, for the part's tensors (sae.W_enc, ...)."""
        return self.sae.latent_dim(name.removeprefix("sae."))

    @property
    def b_dec(self) -> Tensor:
        return self.sae.b_dec

    def scaled(self, x: Tensor) -> Tensor:
        """[..., n * d] with each hookpoint times its scale."""
        return (self.per_layer(x, self.cfg.d_in, "inputs") * self.layer_scales()[:, None]).flatten(
            -2
        )

    def unscaled(self, x_s: Tensor) -> Tensor:
        return (
            self.per_layer(x_s, self.cfg.d_in, "outputs") / self.layer_scales()[:, None]
        ).flatten(-2)

    scale_target = scaled

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode(self.scaled(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.unscaled(self.sae.decode(z))

    def predict(self, x: Tensor, z: Tensor) -> Tensor:
        return self.decode(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_loss(self, x: Tensor, ctx: TrainContext, y: Tensor | None = None) -> LossOutput:
        """The part's own loss on the scaled concatenation (a crosscoder predicts its input)."""
        out = self.sae.training_loss(self.scaled(x), ctx)
        return out._replace(x_hat=self.unscaled(out.x_hat))

    def folded_state_dict(self) -> dict[str, Tensor]:
        """W_enc's rows of hookpoint i times s_i, W_dec's columns and b_dec's entries / s_i: then
        (x - b_dec') @ W_enc' = (x * s - b_dec) @ W_enc, and the outputs are in model units."""
        s = self.layer_scales().repeat_interleave(self.cfg.d_in)  # [n * d]
        state = {name: w.detach() for name, w in self.state_dict().items()}
        state["sae.W_enc"] = state["sae.W_enc"] * s[:, None]
        state["sae.W_dec"] = state["sae.W_dec"] / s
        state["sae.b_dec"] = state["sae.b_dec"] / s
        return state

    def decoder_directions(self) -> Tensor:
        """[F, n * d]: each latent's directions at every hookpoint, in model units."""
        return self.folded_state_dict()["sae.W_dec"]

    def extra_repr(self) -> str:
        return f"{self.cfg.architecture} over {self.cfg.hook_names}, d_sae={self.cfg.d_sae}"
