"""The SAE architectures: one small class each on a shared base, registered by SAELens's names.

Every architecture reads the same way (shapes: x [..., d_in], z [..., d_sae]):

    x_in  = x * s - b_dec                  s: input scale (1 unless normalize_activations is on)
    pre   = x_in @ W_enc + b_enc           [..., d_sae]
    z     = activate(pre)                  the architecture's sparsity rule
    x_hat = (z @ W_dec + b_dec) / s        [..., d_in]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae.config import SAEConfig
from sae.kernels import (
    Selection,
    batch_topk_selection,
    largest,
    sparse_decode,
    sparse_encode,
    topk_selection,
)

REGISTRY: dict[str, type[SAE]] = {}


@dataclass
class TrainContext:
    """What a training step tells the SAE's loss beyond the batch."""

    sparsity_coefficient: float = 0.0
    """L1 (standard, gated) or L0 (jumprelu) penalty weight, after warm-up."""
    aux_coefficient: float = 1 / 32
    """AuxK (top-k styles) or auxiliary reconstruction (gated) weight."""
    dead: Tensor | None = None
    """[d_sae] bool: latents that have not fired within the dead window."""
    bandwidth: float = 0.05
    """JumpReLU's straight-through kernel width."""


class LossOutput(NamedTuple):
    loss: Tensor
    """The scalar to minimise: the sum of `parts`."""
    x_hat: Tensor
    """[batch, d_in] reconstruction, in the model's units."""
    parts: dict[str, Tensor]
    """Named loss terms (SAELens's names: mse_loss, l1_loss, l0_loss, auxiliary_reconstruction_loss)."""
    fired: Tensor
    """[d_sae] bool: latents active on some row of the batch (dead-latent tracking)."""
    l0: Tensor
    """Mean active latents per row."""
    z: Tensor | None = None
    """[batch, d_sae] codes used for the reconstruction; None on the sparse top-k path..."""
    smallest: Tensor | None = None
    """...which gives the smallest activation it kept instead (inf when none): BatchTopK's
    threshold statistic."""


def register(cls: type[SAE]) -> type[SAE]:
    REGISTRY[cls.architecture] = cls
    return cls


class SAE(nn.Module):
    """Shared parameters and the encode/decode skeleton; subclasses supply `activate`."""

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]
    """The architecture SAELens loads the saved weights as (its inference class)."""
    uses_k: ClassVar[bool] = False
    """Whether cfg.k sets the sparsity (top-k styles)."""
    latent_scaled: ClassVar[tuple[str, ...]] = ("b_enc",)
    """Per-latent encoder tensors that scale with a latent's code (for fold_decoder_norm_)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        kw: dict[str, Any] = {"dtype": cfg.torch_dtype, "device": cfg.device}
        W_dec = torch.empty(cfg.d_sae, cfg.d_in, **kw)
        if W_dec.device.type != "meta":
            nn.init.kaiming_uniform_(W_dec)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [d_sae, d_in], rows are the latents' directions
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [d_in, d_sae], initialised as the transpose
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.init_encoder_params(kw)

    def init_encoder_params(self, kw: dict[str, Any]) -> None:
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))

    # -- the forward path ---------------------------------------------------------------------
    @property
    def input_scale(self) -> float:
        return self.cfg.norm_scaling_factor if self.cfg.normalize_activations != "none" else 1.0

    def check_width(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):  # a numpy array raised AttributeError on .to
            raise TypeError(
                f"SAE inputs are torch tensors [..., d_in={self.cfg.d_in}], got "
                f"{type(x).__module__}.{type(x).__name__} (torch.as_tensor(x) converts an array)"
            )
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE for {self.cfg.hook_name!r} expects activations with last dimension "
                f"d_in={self.cfg.d_in}, got shape {tuple(x.shape)}"
            )

    def sae_input(self, x: Tensor) -> Tensor:
        """x_in = x * s - b_dec, in the parameters' dtype; refuses activations of the wrong width."""
        self.check_width(x)
        x = x.to(self.W_enc.dtype) * self.input_scale
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        return self.sae_input(x) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae] sparse codes (dense tensor, mostly zeros)."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_in]: x_hat = (z @ W_dec + b_dec) / s."""
        if z.shape[-1] != self.cfg.d_sae:
            raise ValueError(
                f"decode expects codes with last dimension d_sae={self.cfg.d_sae}, got shape {tuple(z.shape)}"
            )
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # -- training -----------------------------------------------------------------------------
    def training_loss(self, x: Tensor, ctx: TrainContext) -> LossOutput:
        """MSE (summed over d_in, mean over rows) in the normalized units the SAE works in, plus
        the architecture's penalty terms."""
        x_s = x.to(self.W_enc.dtype) * self.input_scale  # [batch, d_in]
        pre = self.pre_acts(x)  # [batch, d_sae]
        z = self.train_activate(x, pre, ctx)
        parts, x_hat_s = self.reconstruction_loss(z, x_s)
        parts |= self.penalties(x_s, pre, z, x_hat_s, ctx)
        active = z.detach() > 0
        return LossOutput(
            sum(parts.values()), x_hat_s / self.input_scale, parts, active.any(0),
            active.sum(-1).float().mean(), z,
        )  # fmt: skip

    def train_activate(self, x: Tensor, pre: Tensor, ctx: TrainContext) -> Tensor:
        """The sparsity rule while training (differs from `activate` for JumpReLU and BatchTopK)."""
        return self.activate(pre)

    def reconstruction_loss(self, z: Tensor, x_s: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The reconstruction terms of the loss, by name, and the reconstruction x_hat_s."""
        x_hat_s = z @ self.W_dec + self.b_dec
        return {"mse_loss": mse(x_hat_s, x_s)}, x_hat_s

    def sparse_reconstruction_loss(
        self, values: Tensor, rows: Tensor, latents: Tensor, x_s: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """reconstruction_loss for a code given as its entries (sorted by row)."""
        x_hat_s = sparse_decode(values, rows, latents, self.W_dec, len(x_s)) + self.b_dec
        return {"mse_loss": mse(x_hat_s, x_s)}, x_hat_s

    def penalties(
        self, x_s: Tensor, pre: Tensor, z: Tensor, x_hat_s: Tensor, ctx: TrainContext
    ) -> dict[str, Tensor]:
        return {}

    @torch.no_grad()
    def before_step(self) -> None:
        """Gradient edits the recipe applies before each optimizer step (none by default)."""

    @torch.no_grad()
    def after_step(self, out: LossOutput) -> None:
        """Constraints the recipe applies after each optimizer step (none by default)."""

    def sparse_training_loss(self, x: Tensor, ctx: TrainContext, select: Selection) -> LossOutput:
        """The dense loss (MSE + AuxK) of the top-k styles on the sparse path of sae/kernels.py:
        one encoder pass yields the selected entries and the dead latents' columns; only those
        are decoded and differentiated."""
        dead = self.dead_latents(ctx)
        self.check_width(x)
        x_s = x.to(self.W_enc.dtype) * self.input_scale
        shift = self.b_dec if self.cfg.apply_b_dec_to_input else torch.zeros_like(self.b_dec)
        values, rows, latents, pre_dead = sparse_encode(
            x_s, shift, self.W_enc, self.b_enc, select, dead
        )
        values = values.relu()
        parts, x_hat_s = self.sparse_reconstruction_loss(values, rows, latents, x_s)
        parts["auxiliary_reconstruction_loss"] = (
            self.dead_auxk_loss(x_s, x_hat_s, pre_dead, dead, ctx)
            if len(dead)
            else x_s.new_zeros(())
        )
        active = values.detach() > 0
        # entries ReLU'd to zero mark a spare slot past the end: a boolean index would make the
        # host wait for the device (as would anything here that depends on the data's values)
        slots = latents.masked_fill(~active, self.cfg.d_sae)
        fired = torch.zeros(self.cfg.d_sae + 1, dtype=torch.bool, device=x.device)
        fired = fired.index_fill_(0, slots, True)[:-1]
        return LossOutput(
            sum(parts.values()), x_hat_s / self.input_scale, parts, fired,
            active.sum() / len(x), smallest=smallest_active(values.detach()),
        )  # fmt: skip

    def dead_latents(self, ctx: TrainContext) -> Tensor:
        """Indices of the latents AuxK trains (the dead ones; none when the trainer sent no mask)."""
        if ctx.dead is None:
            return torch.zeros(0, dtype=torch.long, device=self.W_dec.device)
        return ctx.dead.nonzero().squeeze(1)

    def auxk_loss(self, x_s: Tensor, x_hat_s: Tensor, pre: Tensor, ctx: TrainContext) -> Tensor:
        """AuxK (Gao et al. 2024): the top k_aux = d_in/2 dead latents reconstruct the residual
        the live ones left, which gives dead latents a gradient back to useful directions."""
        dead = self.dead_latents(ctx)
        if not len(dead):
            return pre.new_zeros(())
        return self.dead_auxk_loss(x_s, x_hat_s, pre[:, dead], dead, ctx)

    def dead_auxk_loss(
        self, x_s: Tensor, x_hat_s: Tensor, pre_dead: Tensor, dead: Tensor, ctx: TrainContext
    ) -> Tensor:
        """AuxK from the dead latents' pre-activations [batch, n_dead] alone: dense matmuls over
        the dead columns, usually a small share of d_sae; scaled down when fewer than k_aux."""
        k_aux = min(self.cfg.d_in // 2, len(dead))
        residual_hat = auxk_activation(pre_dead, k_aux) @ self.W_dec[dead]
        residual = (x_s - x_hat_s).detach()
        scale = k_aux / (self.cfg.d_in // 2)
        return ctx.aux_coefficient * scale * mse(residual_hat, residual)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of W_dec's gradient along each row, so a step does not change row norms
        to first order (renormalizing after the step removes the rest)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)  # [d_sae, 1]
            self.W_dec.grad -= parallel * self.W_dec

    # -- decoder norms ------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Set every decoder row to unit norm (recipes that constrain W_dec call this per step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(
            torch.finfo(self.W_dec.dtype).eps
        )

    @torch.no_grad()
    def fold_decoder_norm_(self) -> None:
        """Make decoder rows unit norm without changing any output: latent i's code is multiplied
        by ||W_dec[i]|| and its decoder row divided by it. Only exact where the sparsity rule is
        per latent; top-k selection would change, so TopK-style SAEs refuse."""
        if not self.latent_scaled:
            raise ValueError(
                f"{self.architecture} SAEs cannot fold decoder norms: it would change which latents are selected"
            )
        norms = self.W_dec.norm(dim=1).clamp_min(torch.finfo(self.W_dec.dtype).eps)  # [d_sae]
        self.W_dec /= norms[:, None]
        self.W_enc *= norms
        for name in self.latent_scaled:
            getattr(self, name).mul_(norms)

    # -- input normalization ------------------------------------------------------------------
    def folded_state_dict(self) -> dict[str, Tensor]:
        """The weights with the input scale s folded in, so that s = 1 gives the same outputs:
        W_enc * s, W_dec / s, b_dec / s (pre-activations are unchanged)."""
        state = {name: t.detach() for name, t in self.state_dict().items()}
        s = self.input_scale
        if s != 1.0:
            state["W_enc"] = state["W_enc"] * s
            state["W_dec"] = state["W_dec"] / s
            state["b_dec"] = state["b_dec"] / s
        return state

    def save(self, path: str) -> None:
        """cfg.json + sae_weights.safetensors in SAELens's layout (see sae.io.save)."""
        from sae.io import save

        save(self, path)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}, hook={c.hook_name!r}"


@register
class StandardSAE(SAE):
    """ReLU SAE trained with an L1 penalty: z = relu(pre)."""

    architecture = saelens_architecture = "standard"

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def penalties(self, x_s, pre, z, x_hat_s, ctx):
        """L1 of the codes weighted by decoder norms (Anthropic, April 2024): the decoder is left
        free, and shrinking codes by growing rows gains nothing."""
        return {"l1_loss": ctx.sparsity_coefficient * (z * self.W_dec.norm(dim=1)).sum(-1).mean()}


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep each row's k largest pre-activations (ReLU'd), zero the rest."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def auxk_activation(pre: Tensor, k: int) -> Tensor:
    """topk_activation for AuxK's dead latents, where k = d_in/2 is a large share of the columns:
    when no row has more than k positive pre-activations (dead latents' are mostly negative), the
    ReLU'd top k is the ReLU itself, and on CPU that skips a topk costing a twentieth of a training
    step. On CUDA topk is cheap and the check would make the host wait for the device."""
    if pre.device.type != "cuda" and int((pre > 0).sum(-1).max()) <= k:
        return pre.relu()
    return topk_activation(pre, k)


def batch_topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the k * n_rows largest ReLU'd pre-activations of the whole batch, so rows that need
    more latents get more while the batch averages k."""
    acts = pre.relu()
    flat = acts.flatten()
    n_rows = acts.shape[:-1].numel()
    values, indices = largest(flat, min(k * n_rows, flat.numel()))
    return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)


def smallest_active(z: Tensor) -> Tensor:
    """The smallest positive entry of z, inf when there is none."""
    return z.masked_fill(z <= 0, math.inf).min()


def jumprelu_activation(pre: Tensor, threshold: Tensor) -> Tensor:
    """z = relu(pre) where pre > threshold, else 0 (SAELens's JumpReLU)."""
    return pre.relu() * (pre > threshold)


@register
class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): z = topk(relu(pre), k) per row."""

    architecture = saelens_architecture = "topk"
    uses_k = True
    latent_scaled = ()

    def activate(self, pre: Tensor) -> Tensor:
        return topk_activation(pre, self.cfg.k)

    def penalties(self, x_s, pre, z, x_hat_s, ctx):
        """AuxK, as the dense reference (SAE.training_loss) computes it; training takes the
        sparse path below."""
        return {"auxiliary_reconstruction_loss": self.auxk_loss(x_s, x_hat_s, pre, ctx)}

    def training_loss(self, x: Tensor, ctx: TrainContext) -> LossOutput:
        return self.sparse_training_loss(x, ctx, topk_selection(self.cfg.k))

    @torch.no_grad()
    def before_step(self) -> None:
        self.remove_parallel_grad_()

    @torch.no_grad()
    def after_step(self, out: LossOutput) -> None:
        self.normalize_decoder_()  # unit rows: code magnitudes carry the scale


def rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class JumpReLUSTE(torch.autograd.Function):
    """z = pre * [pre > threshold]; d/dthreshold by the rectangle-kernel estimator,
    -threshold/bandwidth * K((pre - threshold)/bandwidth), summed over the batch."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = rectangle((pre - threshold) / ctx.bandwidth) / ctx.bandwidth
        grad_threshold = -(threshold * kernel * grad).sum(0)
        return (pre > threshold) * grad, grad_threshold, None


class StepSTE(torch.autograd.Function):
    """[pre > threshold]; d/dthreshold = -1/bandwidth * K((pre - threshold)/bandwidth)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = rectangle((pre - threshold) / ctx.bandwidth) / ctx.bandwidth
        return None, -(kernel * grad).sum(0), None


@register
class JumpReLUSAE(SAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): a learned per-latent threshold."""

    architecture = saelens_architecture = "jumprelu"
    latent_scaled = ("b_enc", "threshold")

    def init_encoder_params(self, kw: dict[str, Any]) -> None:
        super().init_encoder_params(kw)
        self.threshold = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))

    def activate(self, pre: Tensor) -> Tensor:
        return jumprelu_activation(pre, self.threshold)

    def train_activate(self, x: Tensor, pre: Tensor, ctx: TrainContext) -> Tensor:
        return JumpReLUSTE.apply(pre, self.threshold, ctx.bandwidth)

    def penalties(self, x_s, pre, z, x_hat_s, ctx):
        """L0 through the step function's straight-through estimator (Rajamanoharan et al.)."""
        l0 = StepSTE.apply(pre, self.threshold, ctx.bandwidth).sum(-1).mean()
        return {"l0_loss": ctx.sparsity_coefficient * l0}

    @torch.no_grad()
    def after_step(self, out: LossOutput) -> None:
        self.threshold.clamp_(min=0.0)


@register
class BatchTopKSAE(SAE):
    """BatchTopK SAE (Bussmann et al. 2024). Training keeps the batch's k * n_rows largest
    activations (`batch_activate`); inference is a JumpReLU with one threshold for every latent,
    the running estimate of the smallest kept activation, so a row's code does not depend on the
    other rows in its batch. Saved as a JumpReLU SAE, as SAELens does."""

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    uses_k = True
    latent_scaled = ()

    def init_encoder_params(self, kw: dict[str, Any]) -> None:
        super().init_encoder_params(kw)
        self.register_buffer("threshold", torch.zeros(self.cfg.d_sae, **kw))  # [d_sae], one value

    def activate(self, pre: Tensor) -> Tensor:
        return jumprelu_activation(pre, self.threshold)

    def batch_activate(self, pre: Tensor) -> Tensor:
        return batch_topk_activation(pre, self.cfg.k)

    def train_activate(self, x: Tensor, pre: Tensor, ctx: TrainContext) -> Tensor:
        return self.batch_activate(pre)

    def penalties(self, x_s, pre, z, x_hat_s, ctx):
        return {"auxiliary_reconstruction_loss": self.auxk_loss(x_s, x_hat_s, pre, ctx)}

    def training_loss(self, x: Tensor, ctx: TrainContext) -> LossOutput:
        return self.sparse_training_loss(x, ctx, batch_topk_selection(self.cfg.k))

    @torch.no_grad()
    def before_step(self) -> None:
        self.remove_parallel_grad_()

    @torch.no_grad()
    def after_step(self, out: LossOutput, rate: float = 0.01) -> None:
        """Unit decoder rows, and the inference threshold tracks (EMA) the smallest activation
        the batch top-k kept."""
        self.normalize_decoder_()
        smallest = out.smallest if out.z is None else smallest_active(out.z)
        smallest = smallest.to(self.threshold.dtype)
        # the first step starts the average at the value, not at 0; a batch where nothing fired
        # leaves it; both decided on the device, without a host sync
        average = torch.where(
            self.threshold.any(), self.threshold * (1 - rate) + rate * smallest, smallest
        )
        self.threshold.copy_(torch.where(smallest.isfinite(), average, self.threshold))


@register
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025): the first m latents must reconstruct on
    their own for every prefix width m, so early latents learn general features and later ones
    refine them. Inference is BatchTopK's."""

    architecture = "matryoshka_batchtopk"

    @property
    def widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths) or default_matryoshka_widths(self.cfg.d_sae)

    def reconstruction_loss(self, z: Tensor, x_s: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        return self.prefix_losses(self.prefix_decodes(z, scaled=True), x_s)

    def sparse_reconstruction_loss(
        self, values: Tensor, rows: Tensor, latents: Tensor, x_s: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Each group of latents decodes its own entries; the groups' decodes add up to the
        prefixes', so the decoder costs what one full sparse decode costs."""

        def group(start: int, end: int) -> Tensor:
            keep = (latents >= start) & (latents < end)
            return sparse_decode(values[keep], rows[keep], latents[keep], self.W_dec, len(x_s))

        return self.prefix_losses(self.prefix_sums(group), x_s)

    def prefix_losses(self, decodes: list[Tensor], x_s: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Every prefix's MSE, summed into the loss as in the paper and SAELens, under SAELens's
        names: mse_loss for the full SAE, inner_mse_loss_<m> for the first m latents."""
        inner = {
            f"inner_mse_loss_{m}": mse(x_hat, x_s)
            for m, x_hat in zip(self.widths[:-1], decodes[:-1], strict=True)
        }
        return {"mse_loss": mse(decodes[-1], x_s), **inner}, decodes[-1]

    def prefix_decodes(self, z: Tensor, scaled: bool = False) -> list[Tensor]:
        """x_hat from the first m latents, for each prefix width m; the last equals decode(z).
        `scaled` keeps them in the SAE's normalized units (for the loss)."""
        dtype = self.W_dec.dtype
        decodes = self.prefix_sums(
            lambda start, end: z[..., start:end].to(dtype) @ self.W_dec[start:end]
        )
        return decodes if scaled else [x_hat / self.input_scale for x_hat in decodes]

    def prefix_sums(self, group: Callable[[int, int], Tensor]) -> list[Tensor]:
        """b_dec plus the decode of latents [0, m), for each prefix width m, from group(start,
        end), the decode of latents [start, end)."""
        out, partial, start = [], self.b_dec, 0
        for end in self.widths:
            partial = partial + group(start, end)
            out.append(partial)
            start = end
        return out


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """d/8, d/4, d/2, d: four nested prefixes (fewer when d_sae is tiny)."""
    return sorted({max(1, d_sae >> shift) for shift in (3, 2, 1, 0)})


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Squared error summed over d_in, averaged over rows (SAELens's mse_loss)."""
    return (x_hat - x).pow(2).sum(-1).mean()


@register
class GatedSAE(SAE):
    """Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude
    path with the same directions rescaled by exp(r_mag) decides how much:
    z = [x_in @ W_enc + b_gate > 0] * relu(x_in @ (W_enc * exp(r_mag)) + b_mag)."""

    architecture = saelens_architecture = "gated"
    latent_scaled = ("b_gate", "b_mag")

    def init_encoder_params(self, kw: dict[str, Any]) -> None:
        self.b_gate = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(self.cfg.d_sae, **kw))

    def pre_acts(self, x: Tensor) -> Tensor:
        """The gate's pre-activation (what decides firing)."""
        return self.sae_input(x) @ self.W_enc + self.b_gate

    def encode(self, x: Tensor) -> Tensor:
        return self.train_activate(x, self.pre_acts(x), TrainContext())

    def train_activate(self, x: Tensor, pre: Tensor, ctx: TrainContext) -> Tensor:
        """`pre` is the gate's pre-activation; the hard gate passes no gradient (the auxiliary
        loss trains it)."""
        magnitude = (self.sae_input(x) @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
        return (pre > 0) * magnitude

    def penalties(self, x_s, pre, z, x_hat_s, ctx):
        """L1 on the gate's ReLU'd pre-activations (weighted by decoder norms), and an auxiliary
        loss that makes those alone reconstruct x through a frozen decoder, which gives the gate
        its gradient (Rajamanoharan et al. 2024)."""
        gate = pre.relu()
        aux_hat = gate @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "l1_loss": ctx.sparsity_coefficient * (gate * self.W_dec.norm(dim=1)).sum(-1).mean(),
            "auxiliary_reconstruction_loss": mse(aux_hat, x_s),
        }
