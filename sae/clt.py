"""Cross-layer transcoders (Ameisen et al. 2025, "Circuit Tracing"): layer i's latents read that
layer's MLP input and write to the MLP outputs of layers i..n-1, trained jointly, so that each MLP
output is predicted by the latents of every layer up to its own. They are what circuit-tracer
builds attribution graphs from; a chain of per-layer transcoders would split one computation
that spans several MLPs into as many features.

Layer i's part is one of sae.models' dictionaries: a transcoder from layer i's input to the
concatenated outputs of layers i..n-1 (d_out = (n - i) * d). So each sparsity rule keeps its own
encoder and training recipe (thresholds, AuxK, unit decoder rows); this module adds the sum over
layers, the per-layer scales and the joint loss. Shapes, n layers, F latents per layer:

    z_i     = part_i.encode(x_i * s_i - c_i)                            [..., F]
    y_hat_j = (sum_{i <= j} z_i @ W_dec_i[:, block j] + b_dec_j) / t_j    [..., d_out]

Inputs and outputs travel concatenated over layers ([..., n * d_in] and [..., n * d_out], in layer
order), which is how the trainer hands a dictionary the hookpoints it reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from sae.config import DTYPES, ConfigError, SAEConfig
from sae.kernels import support_decode
from sae.layered import LayeredDictionary, LayersConfig
from sae.models import REGISTRY, SAE, LossOutput, TrainContext, firing, mse, smallest_active

KIND = "cross_layer_transcoder"
"""cfg.json's `dictionary` for a CLT (a plain SAE's cfg.json has no such key)."""
LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
COEFFICIENTS = {"jumprelu": 0.3}
"""A CLT's penalty weight where one was measured, held at every length and width (bench/clt.py
--coefficients: 30 SmolLM2 layers, 576 latents and k 16 per layer, 78 steps). JumpReLU's L0
hardly heeds it: uncentred, 107 / 97 / 84 / 66 at 0.03 / 0.1 / 0.3 / its SAE weight 0.77, where
0.3 recovered the most of the CE loss (0.719, against 0.687 at 0.77); centred (decision 76), 62 /
59 / 53 at 0.03 / 0.1 / 0.3 for 0.757 / 0.777 / 0.769, one run each (docs/transcoders.md). Other
rules take their SAE weight (not measured)."""
AIMED_AT_K = ("jumprelu",)
"""Rules whose CLT, left at its defaults, aims its penalty at L0 k (SAESpec.target_l0). Over 30
SmolLM2 layers (576 latents, k 16 each, the rule's rate, random decoder rows) a JumpReLU CLT
aimed at k recovered 0.871 of the CE loss at 156 steps, L0 349 of 480, where under the L0
penalty its code thinned to L0 72 and it recovered 0.784 (at 78 steps 0.737 and 0.747: the pull
back toward k takes its time; docs/transcoders.md). The other rules set L0 by k or penalise L1."""
RULES = ("standard", "topk", "batchtopk", "jumprelu", "gated")
"""Rules a CLT's layers may use: Matryoshka's prefix losses are per dictionary, not per layer."""


@dataclass
class CLTConfig(LayersConfig):
    """Shape, rule and provenance of one cross-layer transcoder: `hook_names` are each layer's
    input (blocks.L.<kind>, one kind), `d_sae` its latents."""

    architecture: str = "jumprelu"
    """Every layer's sparsity rule: standard, topk, batchtopk, jumprelu or gated."""
    hook_names_out: list[str] = field(default_factory=list)
    """Output hookpoint of each layer (the same layers, another kind: blocks.L.hook_mlp_out)."""
    d_out: int = 0
    """Width of each layer's output; 0 is d_in."""
    norm_scaling_factors_out: list[float] = field(default_factory=list)
    """Output scale of each layer (empty: 1)."""

    kind: ClassVar[str] = KIND
    scale_fields: ClassVar[tuple[str, ...]] = ("norm_scaling_factors", "norm_scaling_factors_out")

    def __post_init__(self) -> None:
        self.d_out = self.d_out or self.d_in
        n = self.n_layers
        if self.architecture not in RULES:
            raise ConfigError(
                f"a cross-layer transcoder's layers use one of {RULES}, not {self.architecture!r}"
            )
        if n == 0 or len(self.hook_names_out) != n:
            raise ConfigError(
                f"a cross-layer transcoder needs one input and one output hookpoint per layer; got "
                f"{len(self.hook_names)} inputs and {len(self.hook_names_out)} outputs"
            )
        layers_in, kinds_in = layer_kinds(self.hook_names)
        layers_out, kinds_out = layer_kinds(self.hook_names_out)
        if layers_in != layers_out or len(kinds_in | kinds_out) != 2 or len(kinds_in) != 1:
            raise ConfigError(
                "a cross-layer transcoder reads one hookpoint kind and writes another at the same "
                f"layers, one per layer in order; got {self.hook_names} -> {self.hook_names_out}"
            )
        if sorted(set(layers_in)) != layers_in:
            raise ConfigError(f"the layers must increase, one hookpoint each; got {layers_in}")
        if self.d_out <= 0:
            raise ConfigError(f"d_out must be positive, got {self.d_out}")
        super().__post_init__()

    @property
    def layers(self) -> list[int]:
        return layer_kinds(self.hook_names)[0]

    @property
    def is_transcoder(self) -> bool:
        return True

    @property
    def total_latents(self) -> int:
        return self.n_layers * self.d_sae

    def part(self, i: int) -> SAEConfig:
        """Layer i's part: a transcoder to the outputs of layers i.. (scales are the CLT's)."""
        return SAEConfig(
            architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae, k=self.k,
            d_out=(self.n_layers - i) * self.d_out, hook_name=self.hook_names[i],
            hook_name_out=self.hook_names_out[i], apply_b_dec_to_input=False,
            model_name=self.model_name, dtype=self.dtype, device=self.device,
        )  # fmt: skip


def layer_kinds(hooks: list[str]) -> tuple[list[int], set[str]]:
    """The layers of blocks.L.<kind> hookpoints and the kinds they name."""
    matches = [LAYER_HOOK.match(h) for h in hooks]
    if not all(matches):
        bad = [h for h, m in zip(hooks, matches, strict=True) if not m]
        raise ConfigError(f"a cross-layer transcoder's hookpoints are blocks.L.<kind>; got {bad}")
    return [int(m.group(1)) for m in matches], {m.group(2) for m in matches}


class CrossLayerTranscoder(LayeredDictionary):
    """n per-layer parts (sae.models dictionaries) and one output bias per output layer."""

    kind = KIND
    config = CLTConfig
    # JumpReLU over 30 SmolLM2 layers, 78 steps: CE loss recovered 0.687 from thresholds at L0 k
    # against 0.594 from 0.01, at the SAE weight (docs/transcoders.md); ReLU-L1's biases start at
    # L0 k as at one hookpoint, where from zero it collapsed (not measured for CLTs); the top-k
    # rules' and Gated's fit changes nothing
    fitted_start = True
    centres_input = True

    def __init__(self, cfg: CLTConfig, latents: range | None = None):
        """`latents`: only these of each layer's d_sae latents (a latent shard's slice, as SAE's)."""
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(self._part(i, latents) for i in range(cfg.n_layers))
        kw = {"dtype": DTYPES[cfg.dtype], "device": cfg.device}
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_layers * cfg.d_out, **kw))

    def _part(self, i: int, latents: range | None) -> SAE:
        """Layer i's dictionary, whose own output bias is a zero buffer: b_dec_j is shared by
        every layer writing to j, and one parameter per output keeps its learning rate that of
        any other weight."""
        part = REGISTRY[self.cfg.architecture](self.cfg.part(i), latents)
        del part.b_dec
        part.register_buffer("b_dec", torch.zeros_like(part.W_dec[0]), persistent=False)
        return part

    @property
    def parts(self) -> list[SAE]:
        return list(self.layers)

    def default_coefficient(self, steps: int, d_sae: int, transcoder: bool = False) -> float:
        """The weight measured for a CLT of this rule (COEFFICIENTS), else its SAE weight."""
        return COEFFICIENTS.get(self.cfg.architecture) or super().default_coefficient(steps, d_sae)

    @property
    def default_target_l0(self) -> bool:
        return self.cfg.architecture in AIMED_AT_K

    def latent_dim(self, name: str) -> int | None:
        """As SAE.latent_dim, for layer i's tensors (layers.i.W_enc, ...); b_dec is replicated."""
        if name == "b_dec":
            return None
        return self.layers[0].latent_dim(name.split(".", 2)[2])

    @property
    def scales(self) -> tuple[Tensor, Tensor]:
        """s [n] and t [n], 1 unless normalize_activations is on."""
        return self.layer_scales(), self.layer_scales("norm_scaling_factors_out")

    def scale_target(self, y: Tensor) -> Tensor:
        """y [..., n * d_out] in the dictionary's units (each layer times its t)."""
        return (self.per_layer(y, self.cfg.d_out, "targets") * self.scales[1][:, None]).flatten(-2)

    def scaled_input(self, x: Tensor) -> Tensor:
        """x [..., n * d_in] in the dictionary's units (each layer times its s), uncentred."""
        return (self.per_layer(x, self.cfg.d_in, "inputs") * self.scales[0][:, None]).flatten(-2)

    def scaled_inputs(self, x: Tensor) -> list[Tensor]:
        """Each layer's input, scaled (its part subtracts its centre)."""
        return list(self.scaled_input(x).unflatten(-1, (-1, self.cfg.d_in)).unbind(-2))

    @torch.no_grad()
    def centre_inputs_(self, centre: Tensor) -> None:
        """Encode x * s - c, c [n * d_in] the first batch's centre of the scaled inputs (the
        trainer's b_dec_init statistic). Uncentred, a CLT lost three quarters of its latents in
        its first dozen steps: SmolLM2's MLP inputs carry a shared component (a fifth to two
        thirds of their energy), so Adam's first, sign-like steps on W_enc moved every row's
        pre-activation together, by about the rate times that component's L1 norm, and the
        random decoders' overshoot pushed them all down (docs/transcoders.md). A saved CLT folds
        c into its encoder biases (folded_state_dict)."""
        for part, c in zip(self.layers, centre.view(-1, self.cfg.d_in), strict=True):
            part.centre_inputs_(c)

    # inference ---------------------------------------------------------------------------------
    def encode_layer(self, i: int, x: Tensor) -> Tensor:
        """Layer i's codes [..., F] from its input [..., d_in] (in the model's units)."""
        return self.layers[i].encode(x.to(self.b_dec.dtype) * self.scales[0][i])

    def encode(self, x: Tensor) -> Tensor:
        """[..., n * d_in] -> [..., n * F]: every layer's codes, concatenated."""
        return torch.cat([p.encode(x_i) for p, x_i in zip(self.layers, self.scaled_inputs(x),
                                                             strict=True)], -1)  # fmt: skip

    def decode_layer(self, j: int, codes: list[Tensor]) -> Tensor:
        """Output j [..., d_out] from the codes of layers 0..j (codes[i] for layer i)."""
        d = self.cfg.d_out
        y = self.b_dec[j * d : (j + 1) * d]
        for i in range(j + 1):
            block = self.layers[i].W_dec[:, (j - i) * d : (j - i + 1) * d]
            y = y + codes[i].to(block.dtype) @ block
        return y / self.scales[1][j]

    def decode(self, z: Tensor) -> Tensor:
        """[..., n * F] -> [..., n * d_out]."""
        codes = list(z.unflatten(-1, (self.cfg.n_layers, self.cfg.d_sae)).unbind(-2))
        return torch.cat([self.decode_layer(j, codes) for j in range(self.cfg.n_layers)], -1)

    def predict(self, x: Tensor, z: Tensor) -> Tensor:
        return self.decode(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # training ----------------------------------------------------------------------------------
    def training_loss(self, x: Tensor, ctx: TrainContext, y: Tensor | None = None) -> LossOutput:
        """MSE of all layers' outputs together (summed over layers and d_out, mean over rows),
        plus each layer's penalty terms (summed under their names), each computed against the
        outputs it writes: its AuxK reconstructs the joint residual of layers i.., its L1 weighs
        codes by the norm of their whole decoder row."""
        if y is None:
            raise ValueError("a cross-layer transcoder trains on pairs: pass its targets y")
        n, d = self.cfg.n_layers, self.cfg.d_out
        shards = self.layers[0].shards  # where each layer's latents live (a slice of each, sharded)
        x_s, y_s = self.scaled_inputs(x), self.scale_target(y)
        dead = ctx.dead.view(n, -1) if ctx.dead is not None else [None] * n
        contexts = [replace(ctx, dead=m) for m in dead]
        outputs = [y_s.new_zeros(len(y_s), d) for _ in range(n)]
        pres, codes = [], []
        for i, part in enumerate(self.layers):
            pre = part.pre_acts(x_s[i])
            z = part.train_activate(x_s[i], pre, contexts[i])
            # its code's support alone: most of a CLT's cost, W_dec_0 being n * d wide
            decode = support_decode(z, part.decode_support(pre, z, contexts[i]), part.W_dec)
            for j, block in enumerate(decode.split(d, -1), start=i):
                outputs[j] = outputs[j] + block
            pres.append(pre)
            codes.append(z)
        y_hat_s = shards.sum(torch.cat(outputs, -1)) + self.b_dec
        terms = {"mse_loss": mse(y_hat_s, y_s)}
        per_layer = []
        for i, part in enumerate(self.layers):
            tail = slice(i * d, None)
            own = part.penalties(y_s[:, tail], pres[i], codes[i], y_hat_s[:, tail],
                                 self.b_dec[tail], contexts[i])  # fmt: skip
            for name, value in own.items():
                terms[name] = terms.get(name, 0) + value
            fired, l0 = firing(codes[i])
            per_layer.append(LossOutput(
                y_s.new_zeros(()), y_hat_s, own, fired, shards.sum(l0),
                smallest=shards.minimum(smallest_active(codes[i].detach())) if part.batch_wide else None,
            ))  # fmt: skip
        y_hat = (y_hat_s.unflatten(-1, (n, d)) / self.scales[1][:, None]).flatten(-2)
        return LossOutput(
            sum(terms.values()), y_hat, terms, torch.cat([o.fired for o in per_layer]),
            sum(o.l0 for o in per_layer), layers=per_layer,
        )  # fmt: skip

    @torch.no_grad()
    def fit_code_scale(self, x: Tensor, y: Tensor | None = None) -> float:
        """The fitted start of a CLT: each layer's biases or thresholds at L0 k on its own input
        (SAE.start_firing), and no scale (1): a CLT's encoders and random decoder rows are
        unrelated, so the least-squares scale of their joint prediction is noise about zero,
        where an SAE's tied start has its codes point along the target."""
        for part, x_i in zip(self.layers, self.scaled_inputs(x), strict=True):
            part.start_firing(x_i)
        return 1.0

    # files -------------------------------------------------------------------------------------
    def folded_state_dict(self) -> dict[str, Tensor]:
        """Weights with s, t and the input centre folded in (each layer's encoder biases less
        c_i @ W_enc_i, W_enc_i * s_i, decoder blocks and b_dec_j / t_j)."""
        s, t = self.scales
        state = {}
        for i, part in enumerate(self.layers):
            own = part.folded_state_dict()  # its centre folded into its biases
            own["W_enc"] = own["W_enc"] * s[i]
            own["W_dec"] = self.folded_decoder(i).flatten(-2)
            state |= {f"layers.{i}.{name}": w for name, w in own.items()}
        b_dec = self.b_dec.detach().unflatten(-1, (-1, self.cfg.d_out))
        return state | {"b_dec": (b_dec / t[:, None]).flatten(-2)}

    def decoder_directions(self, latents: Sequence[int] | None = None) -> Tensor:
        """[latents, n * d_out] (all n * F latents when None): each latent's writes to all output
        layers in model units, zero at the layers before its own. Built for the latents asked
        only: the whole is n x F x n x d (10 GB at 30 x 4608 x 576), a dashboard needs a few."""
        n, f, t = self.cfg.n_layers, self.cfg.d_sae, self.scales[1]
        ids = torch.arange(n * f) if latents is None else torch.as_tensor(list(latents))
        layer, own = ids.to(t.device) // f, ids.to(t.device) % f
        rows = torch.zeros(len(ids), n, self.cfg.d_out, dtype=t.dtype, device=t.device)
        for i in layer.unique().tolist():
            pick = layer == i
            rows[pick, i:] = self.folded_decoder(i, own[pick])
        return rows.flatten(-2)

    def folded_decoder(self, i: int, latents: Tensor | None = None) -> Tensor:
        """Layer i's decoder blocks in model units [latents (all when None), n - i, d_out]: its
        writes to layers i.. divided by their output scales."""
        w = self.layers[i].W_dec.detach()
        blocks = (w if latents is None else w[latents]).unflatten(-1, (-1, self.cfg.d_out))
        return blocks / self.scales[1][i:, None]

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{c.architecture}, layers {c.layers}, {c.hook_names[0]} -> "
                f"{c.hook_names_out[0]}..., d_in={c.d_in}, d_sae={c.d_sae} per layer")  # fmt: skip
