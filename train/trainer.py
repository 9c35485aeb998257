"""Fit one or many SAEs on the same batches: `train.fit(...)` and `sae train`.

Each SAE is a `Member`: the module, its Adam optimizer and schedule, and its dead-latent counter.
One loop reads a batch (all hookpoints at once, from a train/sources.py Source) and steps every
member on it. Checkpointing is in checkpoint.py, metrics in tracking.py; the dictionaries' losses
and training recipes are theirs (sae/models.py, sae/clt.py, sae/crosscoder.py).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.clt import CLTConfig, CrossLayerTranscoder
from sae.config import SAEConfig
from sae.crosscoder import Crosscoder, CrosscoderConfig
from sae.layered import LayeredDictionary
from sae.locks import exclusive
from sae.models import REGISTRY, SAE, TARGET_L0_COEFFICIENT, WHOLE, LossOutput, TrainContext, Whole
from sae.progress import progress
from train import checkpoint
from train.config import HarvestConfig, SAESpec, TextOptions, TrainConfig
from train.device import host_core_spare, resolve_device
from train.distributed import World
from train.prefetch import prefetched
from train.schedule import default_lr, default_warmup, lr_lambda, param_groups
from train.sources import Data, Source, source_for
from train.tracking import Tracker


class NonFiniteLoss(FloatingPointError):
    """A NaN/inf loss: the run stops; its last checkpoint, if it wrote one, is from before it."""


# -- reading ahead ---------------------------------------------------------------------------------
def pinned(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Page-locked copies of host tensors: their copy to the GPU then runs without the host
    waiting (tensors already on a GPU stay)."""
    return {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in batch.items()}


class StepMetrics:
    """A step's metrics on their way to the host: stacked into one tensor whose copy is queued
    right behind the step, with an event marking its end, so reading them waits for that step
    and never for the one queued after it (an .item() each would also wait once each)."""

    def __init__(self, values: dict[str, Tensor | float], diverged: dict[str, Tensor]):
        self.values = values
        self.tensors = [k for k, v in values.items() if isinstance(v, Tensor)]
        self.diverged = list(diverged)
        stacked = torch.stack(
            [v.double() for v in [*map(values.get, self.tensors), *diverged.values()]]
        )
        self.host = stacked.to("cpu", non_blocking=True)
        self.done = torch.cuda.Event() if stacked.is_cuda else None
        if self.done is not None:  # on the copy's stream: the current device may be another GPU
            self.done.record(torch.cuda.current_stream(stacked.device))

    def read(self) -> tuple[dict[str, float], list[str]]:
        """The metrics as numbers (counts as integers), and the SAEs whose loss was NaN/inf."""
        if self.done is not None:
            self.done.synchronize()
        numbers = self.host.tolist()
        values = dict(self.values)
        for name, number in zip(self.tensors, numbers, strict=False):
            values[name] = number if self.values[name].is_floating_point() else int(number)
        flags = numbers[len(self.tensors) :]
        return values, [name for name, flag in zip(self.diverged, flags, strict=True) if flag]


# -- one SAE ---------------------------------------------------------------------------------------
@dataclass
class Member:
    spec: SAESpec
    index: int
    """Its place in the sweep: its tensors' prefix in a checkpoint (m0, m1, ...)."""
    name: str
    sae: SAE | LayeredDictionary
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    tokens_since_fired: Tensor  # [latents]; a CLT's [layers, latents]
    loss: Callable[..., LossOutput]
    """sae.training_loss, or its data-parallel wrapper (World.training_loss)."""
    shards: Whole = WHOLE
    """Where its latents live: all here, or this rank's slice (tokens_since_fired is the slice's)."""

    @property
    def transcoder(self) -> bool:
        return self.sae.cfg.is_transcoder

    def input(self, batch: dict[str, Tensor]) -> Tensor:
        """What the member reads: its hookpoint's rows, or a CLT's layers side by side."""
        return _joined(batch, self.spec.inputs())

    def target(self, batch: dict[str, Tensor]) -> Tensor:
        """What the member predicts: its input's rows, or a transcoder's outputs."""
        return _joined(batch, self.spec.outputs())


def _joined(batch: dict[str, Tensor], hooks: list[str]) -> Tensor:
    return batch[hooks[0]] if len(hooks) == 1 else torch.cat([batch[h] for h in hooks], -1)


def member_name(spec: SAESpec) -> str:
    if spec.name:
        return spec.name
    uses_k = getattr(REGISTRY.get(spec.architecture), "uses_k", False)
    k = f"-target{spec.k}" if spec.target_l0 else f"-k{spec.k}" if uses_k else ""
    width = spec.expansion_factor if not spec.d_sae else spec.d_sae
    hooks = [spec.hook] if spec.hook else []  # none: tensors of unknown origin
    hooks += [spec.hook_out] if spec.hook_out not in ("", spec.hook) else []
    skip = "-skip" if spec.skip else ""
    preact = f"-preact{spec.pre_act_coefficient:g}" if spec.pre_act_coefficient >= 0 else ""
    kind = "clt" if spec.hook_out else "crosscoder"
    clt = f"{kind}-L{spec.layers.replace(',', '_')}-" if spec.layers else ""
    name = f"{clt}{spec.architecture}{k}-x{width}{skip}{preact}"
    return f"{name}-" + "-to-".join(h.replace(".", "_") for h in hooks) if hooks else name


MIN_STEPS = 100
"""Fewer optimizer steps than this and a run is warned to be too short to judge (bench/lr_sweep.py)."""
MAX_DEAD_FRACTION = 0.1
"""A larger share of dead latents at the end is warned about."""


def geometric_median(x: Tensor, iterations: int = 30) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to the rows of x."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1 / (x - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


def build_member(
    cfg: TrainConfig,
    spec: SAESpec,
    index: int,
    source: Source,
    total_steps: int,
    device: torch.device,
    world: World,
) -> Member:
    sharded = world.latent_shards > 1  # each rank builds only its slice (from a whole on meta)
    dictionary = builder(spec)(cfg, spec, source, torch.device("meta") if sharded else device)
    shards: Whole = WHOLE
    if sharded:
        dictionary, shards = world.split_latents(dictionary, member_name(spec), device)
    d_sae = dictionary.cfg.d_sae
    own = dictionary.rate_factor(dictionary.cfg.is_transcoder, d_sae)
    default = default_lr(d_sae, total_steps, own)
    lr = spec.lr or default
    start_decoder(dictionary, spec.decoder_init, rate=lr / default)
    # fused: one pass over each parameter instead of a dozen elementwise kernels (10x on CPU)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(
        param_groups(dictionary, lr), lr=lr, betas=(0.9, 0.999), fused=fused
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else default_warmup(total_steps)
    factor = lr_lambda(warmup, cfg.decay_fraction, total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    # a counter per latent, a CLT's per layer ([layers, d_sae]): a latent shard's are then a slice
    # of the last dimension, as its weights are
    width = d_sae // shards.count
    clt = isinstance(dictionary, CrossLayerTranscoder)
    counters = (dictionary.cfg.n_layers, width) if clt else (width,)
    return Member(
        spec,
        index,
        member_name(spec),
        dictionary,
        optimizer,
        schedule,
        torch.zeros(counters, dtype=torch.long, device=device),
        world.training_loss(dictionary),
        shards=shards,
    )


ZERO_START_SLOWEST = 0.5
"""The slowest rate, as a multiple of the default, at which `auto` zeroes a decoder. In the SAE
rule's units (a TopK transcoder's default was 1.75 of them when measured: decision 64) the zero
start did better on layer 6 at 0.5x-2x, tied on layer 2 at 1x and fell behind there at a hand-set
0.46x, which is 0.15 of today's default of 3 (docs/transcoders.md)."""


@torch.no_grad()
def start_decoder(dictionary: SAE | LayeredDictionary, decoder_init: str, rate: float) -> None:
    """Zero the decoder, or keep its random unit rows. An SAE's random rows are also its encoder's
    columns, so each latent starts reading and writing one direction; a transcoder's encoder reads
    another space, its random rows point nowhere in particular in the output space, and half of a
    TopK transcoder's latents died. From zero, each row is set by its latent's first gradients
    (the output's residual where it fired), as sparsify starts its transcoders. `auto` chooses
    zero for a transcoder at one hookpoint whose rule measured better so (SAE.zero_decoder_start)
    trained at `rate` (its multiple of the default) of at least ZERO_START_SLOWEST."""
    zero = decoder_init == "zero" or (
        decoder_init == "auto"
        and isinstance(dictionary, SAE)
        and dictionary.cfg.is_transcoder
        and dictionary.zero_decoder_start
        and rate >= ZERO_START_SLOWEST
    )
    if zero:
        for part in dictionary.parts:
            part.W_dec.zero_()


def fits_encoder(dictionary: SAE | LayeredDictionary, encoder_init: str) -> bool:
    """Whether the encoder's scale is fitted to the first batch (SAE.fit_code_scale): by hand, or
    under auto for an SAE of a rule measured better so (SAE.fitted_start): the top-k rules, where
    the scale leaves L0 alone, and ReLU-L1 and JumpReLU, whose biases or thresholds the fit also
    starts at L0 k. Not Gated (its L0 swung with the run's length, and at 354 steps it fit worse
    at matched L0). Of the transcoders at one
    hookpoint, JumpReLU's and ReLU-L1's (SAE.transcoder_fitted_start): with a zero decoder there is
    no scale to fit, but the thresholds or biases start at L0 k, where from 0.01 a JumpReLU
    transcoder's stayed far below the pre-activations and from a zero bias a ReLU-L1 one's
    collapsed; each fit half as well (docs/transcoders.md). Of the dictionaries over layers, a
    CLT's (LayeredDictionary.fitted_start)."""
    if encoder_init != "auto":
        return encoder_init == "fitted"
    if isinstance(dictionary, SAE) and dictionary.cfg.is_transcoder:
        return dictionary.transcoder_fitted_start
    return dictionary.fitted_start


def builder(spec: SAESpec) -> Callable[..., SAE | LayeredDictionary]:
    """What builds the dictionary a spec describes: an SAE or transcoder at one hookpoint, or a
    dictionary over layers (a cross-layer transcoder when it writes elsewhere, else a crosscoder)."""
    return build_sae if not spec.layers else build_clt if spec.hook_out else build_crosscoder


def training_bytes(cfg: TrainConfig, spec: SAESpec, source: Source) -> int:
    """About what training a dictionary holds on its device, counted on a copy built without
    memory: float32 weights, their gradients and Adam's two moments, and a batch's
    pre-activations and their gradient. A distributed sweep balances its ranks by it."""
    dictionary = builder(spec)(cfg, spec, source, torch.device("meta"))
    weights = sum(p.numel() for p in dictionary.parameters())
    latents = dictionary.cfg.total_latents if spec.layers else dictionary.cfg.d_sae
    return 4 * (4 * weights + 2 * cfg.batch_size * latents)


def build_sae(cfg: TrainConfig, spec: SAESpec, source: Source, device: torch.device) -> SAE:
    d_in, hook_out = source.d_in[spec.hook], spec.hook_out or spec.hook
    transcoder = hook_out != spec.hook or spec.skip
    sae_cfg = SAEConfig(
        architecture=spec.architecture, d_in=d_in, d_sae=spec.d_sae or spec.expansion_factor * d_in,
        k=spec.k, hook_name=spec.hook, hook_name_out=hook_out, d_out=source.d_in[hook_out],
        skip=spec.skip, apply_b_dec_to_input=not transcoder, device=str(device),
        matryoshka_widths=list(spec.matryoshka_widths),
        normalize_activations="expected_average_only_in" if cfg.normalize else "none",
        norm_scaling_factor=source.scale[spec.hook] if cfg.normalize else 1.0,
        norm_scaling_factor_out=source.scale[hook_out] if cfg.normalize else 1.0, **source.meta,
    )  # fmt: skip
    return REGISTRY[sae_cfg.architecture](sae_cfg)


def build_clt(
    cfg: TrainConfig, spec: SAESpec, source: Source, device: torch.device
) -> CrossLayerTranscoder:
    outputs = spec.outputs()
    return CrossLayerTranscoder(CLTConfig(
        **layered_fields(cfg, spec, source, device), hook_names_out=outputs,
        d_out=one_width(source, outputs, "outputs"),
        norm_scaling_factors_out=[source.scale[h] if cfg.normalize else 1.0 for h in outputs],
    ))  # fmt: skip


def build_crosscoder(
    cfg: TrainConfig, spec: SAESpec, source: Source, device: torch.device
) -> Crosscoder:
    fields = layered_fields(cfg, spec, source, device)
    return Crosscoder(CrosscoderConfig(**fields, matryoshka_widths=list(spec.matryoshka_widths)))


def layered_fields(
    cfg: TrainConfig, spec: SAESpec, source: Source, device: torch.device
) -> dict[str, Any]:
    """The LayersConfig fields of a dictionary over spec's layers (sae/layered.py)."""
    if spec.skip:
        raise ValueError(
            "dictionaries over several layers are trained without a skip path here "
            "(circuit-tracer's CLT files cannot hold one either); drop --skip"
        )
    inputs = spec.inputs()
    d_in = one_width(source, inputs, "inputs")
    return dict(
        architecture=spec.architecture, hook_names=inputs, d_in=d_in,
        d_sae=spec.d_sae or spec.expansion_factor * d_in, k=spec.k,
        normalize_activations="expected_average_only_in" if cfg.normalize else "none",
        norm_scaling_factors=[source.scale[h] if cfg.normalize else 1.0 for h in inputs],
        device=str(device), **source.meta,
    )  # fmt: skip


def one_width(source: Source, hooks: list[str], what: str) -> int:
    widths = {h: source.d_in[h] for h in hooks}
    if len(set(widths.values())) != 1:
        raise ValueError(f"a dictionary over several layers has one width of {what}; got {widths}")
    return widths[hooks[0]]


def keep_freed_memory() -> None:
    """On glibc, keep freed memory in the heap instead of returning it to the OS. A CPU step
    allocates the same large tensors every time ([batch, d_sae] pre-activations: 75 MB at 8x), and
    glibc serves each from a fresh mmap, so every step pays page faults and zeroing on first touch
    (a third of the encoder's time here). PyTorch's CPU tuning guide suggests jemalloc or tcmalloc
    for the same reason; this needs no preloaded library. The process keeps its peak memory;
    SAE_FORGE_KEEP_FREED_MEMORY=0 leaves glibc as it is (say, when training from a notebook)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    if os.environ.get("SAE_FORGE_KEEP_FREED_MEMORY") == "0":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


# -- the run --------------------------------------------------------------------------------------
RESUMABLE = frozenset(
    {"total_tokens", "checkpoint_every", "resume", "overwrite", "out", "wandb_project",
     "wandb_entity", "device", "autocast", "b_dec_init", "cache", "stream", "latent_shards",
     "distribute_sweep",
     *(f.name for f in fields(TextOptions))}
)  # fmt: skip
"""TrainConfig fields a --resume may change: how long (a run extended), where and on what hardware
it runs, and what no longer acts (b_dec_init). The data is compared by what it is (Source.identity:
a cache's shards, a model stream's settings, the text options among them), not by its path, so a
moved cache resumes."""
PER_SAE = frozenset({"sweep", *(f.name for f in fields(SAESpec))})
"""Compared per SAE (its resolved spec), so a sweep's entries may come in another order."""


@contextmanager
def interrupt_between_steps(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """Defer Ctrl-C to the end of the step it lands in: yield a function saying whether it came.
    An interrupt inside the optimizer's update would leave parameters half-stepped, which no
    checkpoint should hold. A second Ctrl-C interrupts at once. Not enabled, or off the main
    thread (where signal handlers cannot be set), nothing changes: ranks of a distributed run
    could stop at different steps and wait on each other's collectives for ever."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    came = threading.Event()

    def handler(signum, frame):
        if came.is_set():
            raise KeyboardInterrupt
        came.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield came.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    def __init__(self, cfg: TrainConfig, data: Data | Source):
        """`data`: a Source (train/sources.py), or what source_for makes one of (a cache's path
        or URL, a HarvestConfig to stream from, an iterable of tensors)."""
        self.cfg = cfg
        self.world = World(cfg.latent_shards, cfg.distribute_sweep)
        self.device = self.world.device(resolve_device(cfg.device))
        if self.device.type == "cpu":
            keep_freed_memory()
        self.world.check_batch_size(cfg.batch_size)
        self.source = source = source_for(data)
        specs = [replace(s, hook=s.hook or source.default_hook()) for s in cfg.specs()]
        for spec in specs:
            source.check(spec.hooks(), member_name(spec))
        self.names = [member_name(s) for s in specs]  # the whole sweep's, wherever trained
        if len(set(self.names)) != len(self.names):
            raise ValueError(
                f"two SAEs of the run share a name: {self.names}; set `name` in the sweep"
            )
        hooks = sorted(set().union(*(s.hooks() for s in specs)))
        source.open(hooks, cfg.batch_size, cfg.seed, self.world.data_rank, self.world.data_size)
        owners = self.world.owners(self.names, lambda i: training_bytes(cfg, specs[i], source))
        mine = [i for i, owner in enumerate(owners) if owner == self.world.rank]
        source.narrow(sorted(set().union(*(specs[i].hooks() for i in mine))))
        self.total_steps = cfg.total_tokens // cfg.batch_size
        self.members = []
        for i in mine:  # each from the seed: as trained alone, whatever else the sweep holds
            torch.manual_seed(cfg.seed)
            self.members.append(
                build_member(cfg, specs[i], i, source, self.total_steps, self.device, self.world)
            )
        self.dead_tokens = cfg.dead_tokens or min(
            10_000_000, max(cfg.batch_size, cfg.total_tokens // 20)
        )
        self.step = 0
        self.last_values: dict[str, float] = {}  # the last step's metrics, for end_advice
        self.saved_step: int | None = None  # the step of the run's last checkpoint
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # one optimizer step for every SAE on one batch
    def train_step(self, batch: dict[str, Tensor]) -> StepMetrics:
        """Steps every member; returns the metrics on their way to the host. Nothing here waits
        for the device but AuxK's dead-latent index."""
        metrics: dict[str, Tensor | float] = {}
        diverged: dict[str, Tensor] = {}
        warm = min(
            1.0, (self.step + 1) / max(1.0, self.cfg.sparsity_warmup_fraction * self.total_steps)
        )
        # this rank's part of the global batch; the dead-latent count is in global rows, as `fired`
        rows = len(next(iter(batch.values()))) * self.world.data_size
        for m in self.members:
            x = m.input(batch).to(self.device, non_blocking=True).float()
            y = m.target(batch).to(self.device, non_blocking=True).float() if m.transcoder else None
            coefficient = self.coefficient(m)
            # AuxK off: no dead mask, so no dead latents' columns are computed for a zero term
            aux = self.cfg.aux_coefficient
            dead = (m.tokens_since_fired > self.dead_tokens).flatten() if aux else None
            ctx = TrainContext(coefficient * warm, aux, dead, target_l0=self.target_l0(m),
                               pre_act_coefficient=self.pre_act(m),
                               batch_mean=self.world.batch_mean)  # fmt: skip
            m.sae.reach_step(self.step, self.total_steps)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.autocast):
                out = m.loss(x, ctx, y)
            m.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()  # averaged over ranks as it runs (World.training_loss)
            m.sae.before_step()
            m.optimizer.step()
            lr = m.optimizer.param_groups[0]["lr"]  # this step's, before the schedule moves on
            m.schedule.step()
            m.sae.after_step(out)
            self.world.average_buffers(m.sae)
            # a NaN/inf loss on any rank stops the run: ORed with the fired latents over ranks
            bad = ~out.loss.detach().isfinite().reshape(1)
            flags = self.world.any_rank(torch.cat([out.fired, bad]))
            fired, diverged[m.name] = flags[:-1], flags[-1]
            m.tokens_since_fired += rows
            m.tokens_since_fired.masked_fill_(fired.view_as(m.tokens_since_fired), 0)
            metrics.update(self.member_metrics(m, x if y is None else y, out, lr))
        return StepMetrics(metrics, diverged)

    def member_metrics(
        self, m: Member, y: Tensor, out: LossOutput, lr: float
    ) -> dict[str, Tensor | float]:
        """SAELens's W&B names (explained variance of the target y: an SAE's input, a
        transcoder's output); suffixed with the SAE's name when a run trains several."""
        with torch.no_grad():
            variance = (y - y.mean(0)).pow(2).sum()
            values = {f"losses/{k}": v.detach() for k, v in out.parts.items()}
            values["losses/overall_loss"] = out.loss.detach()
            values["metrics/explained_variance"] = 1 - (y - out.x_hat).pow(2).sum() / variance
            values["metrics/l0"] = out.l0
            values["sparsity/dead_features"] = m.shards.sum(
                (m.tokens_since_fired > self.dead_tokens).sum()
            )
            values["details/current_learning_rate"] = lr
        return {k + self.suffix(m.name): v for k, v in values.items()}

    def suffix(self, name: str) -> str:
        return f"/{name}" if len(self.names) > 1 else ""

    def coefficient(self, m: Member) -> float:
        """The member's penalty weight: its own, or its rule's for a run of this length and width
        (aiming at L0 k, one weight for every run)."""
        if self.target_l0(m):
            return m.spec.sparsity_coefficient or TARGET_L0_COEFFICIENT
        return m.spec.sparsity_coefficient or m.sae.default_coefficient(
            self.total_steps, m.sae.cfg.d_sae, m.transcoder
        )

    def pre_act(self, m: Member) -> float:
        """The member's pre-activation loss weight: its own, or its rule's (below 0)."""
        return self.in_effect(m, "pre_act_coefficient", m.spec.pre_act_coefficient)

    def target_l0(self, m: Member) -> bool:
        """Whether the member's penalty aims at L0 k: its own choice, or its dictionary's."""
        return self.in_effect(m, "target_l0", m.spec.target_l0)

    @staticmethod
    def in_effect(m: Member, setting: str, value: Any) -> Any:
        """What a value of one of the member's settings trains with: a pre-activation loss weight
        below 0 is the rule's (so a checkpoint from before that default, 0 for a rule without
        the loss, resumes), and an unset target_l0 the dictionary's."""
        if setting == "pre_act_coefficient" and value < 0:
            return m.sae.default_pre_act(m.transcoder)
        if setting == "target_l0" and value is None:
            return m.sae.default_target_l0
        return value

    def record(self, tracker: Tracker, metrics: StepMetrics, step: int) -> None:
        """Log a step's metrics, stopping the run if a loss was NaN/inf on any rank (before any
        checkpoint holds its weights). The run calls this after queueing the next step."""
        values, diverged = metrics.read()
        if self.world.splits_sweep:  # every rank's dictionaries: one record of the run
            shared = self.world.share((values, diverged))
            values = {k: v for rank_values, _ in shared for k, v in rank_values.items()}
            diverged = [name for _, rank_diverged in shared for name in rank_diverged]
        for name in self.names:
            if name in diverged:
                loss = values["losses/overall_loss" + self.suffix(name)]
                what = (
                    f"loss is {loss}"
                    if not math.isfinite(loss)
                    else "loss is NaN/inf on another rank"
                )
                kept = (
                    "no checkpoint was written before it"
                    if self.saved_step is None
                    else f"its checkpoint of step {self.saved_step} in {self.out} is kept"
                )
                raise NonFiniteLoss(f"SAE {name}: {what} at step {step}; {kept}")
        tracker.log(values, step)
        self.last_values = values

    def length_advice(self) -> list[str]:
        """Warnings for a run too short for its settings, one line each naming what to change."""
        steps, warmup = self.total_steps, self.cfg.warmup_steps
        lines = []
        if steps < MIN_STEPS:
            lines.append(
                f"the run has {steps} steps of {self.cfg.batch_size:,} rows: too few for a "
                f"dictionary to mean much (explained variance still climbs steeply below "
                f"{MIN_STEPS}); raise --total-tokens to {MIN_STEPS * self.cfg.batch_size:,} or "
                "lower --batch-size"
            )
        if warmup > steps / 4:
            reach = "never reaches lr" if warmup > steps else f"reaches lr only at step {warmup}"
            lines.append(
                f"warmup_steps={warmup} is longer than a quarter of the run ({steps} steps): the "
                f"learning rate {reach}; lower --warmup-steps (-1: 5% of the run)"
            )
        return lines

    def end_advice(self, values: dict[str, float]) -> list[str]:
        """Warnings for what looks unfinished at the end (dead latents, the rule's own checks:
        an L0 far from k, an unsettled threshold), one line each naming what to change."""
        lines = []
        for m in self.members:
            suffix = self.suffix(m.name)
            coefficient = self.coefficient(m)
            advice = m.sae.training_advice(
                values["metrics/l0" + suffix], coefficient, self.total_steps, self.target_l0(m)
            )
            dead = values["sparsity/dead_features" + suffix] / (
                m.tokens_since_fired.numel() * m.shards.count
            )
            if dead > MAX_DEAD_FRACTION:
                lr = " or --lr" if m.transcoder else ""
                revive = "--pre-act-coefficient" if REGISTRY[m.spec.architecture].aims_l0 else (
                    "--aux-coefficient (top-k rules)"
                )  # fmt: skip
                advice.append(
                    f"{dead:.0%} of the latents are dead at the end (silent for the last "
                    f"{self.dead_tokens:,} tokens): lower --expansion-factor{lr}, or raise "
                    f"{revive} or --total-tokens"
                )
            lines += [f"{m.name}: {line}" for line in advice]
        return lines

    def start_members(self, batch: dict[str, Tensor]) -> None:
        """What the first global batch (gathered from the ranks) sets: b_dec at the geometric
        median (or mean) of the targets, in the dictionary's units, and a transcoder's input centre
        at that of its inputs; then the architecture's own start (JumpReLU's threshold); then the
        encoder's scale where it is fitted."""
        centred = self.cfg.b_dec_init != "zeros"
        for m in self.members:
            fits = fits_encoder(m.sae, m.spec.encoder_init)
            if centred or fits:  # else nothing to take from the batch: no gather
                y = self.world.gather(m.target(batch).to(self.device)).float()
            if m.transcoder and (fits or centred and m.sae.centres_input):
                x = self.world.gather(m.input(batch).to(self.device)).float()
            if centred:
                with torch.no_grad():
                    m.sae.b_dec.copy_(self.centre(m.sae.scale_target(y).float()))
                if m.sae.centres_input:
                    m.sae.centre_inputs_(self.centre(m.sae.scaled_input(x).float()))
            m.sae.start_training()
            if fits:
                if m.transcoder:
                    m.sae.fit_code_scale(x, y)
                else:
                    m.sae.fit_code_scale(y)

    def centre(self, rows: Tensor) -> Tensor:
        """The first batch's centre by b_dec_init: its geometric median or its mean."""
        return geometric_median(rows) if self.cfg.b_dec_init == "geometric_median" else rows.mean(0)

    def run(self) -> list[SAE]:
        """Train to the end and save every SAE, holding the run directory's lock (rank 0 alone
        writes there; in a distributed sweep each rank also saves, and returns, its own)."""
        with exclusive(self.out) if self.world.is_main else nullcontext():
            return self._run()

    def _run(self) -> list[SAE]:
        cfg = self.cfg
        if not cfg.resume and (found := self.previous_run()):
            if not cfg.overwrite:
                raise FileExistsError(
                    f"{self.out} already holds a run ({', '.join(found)}): --resume continues "
                    "it, --overwrite replaces it, or choose another --out"
                )
            if self.world.is_main:  # a later --resume must not pick up the old run's state
                checkpoint.remove(self.out)
        for line in self.length_advice():  # after the refusal: no advice for a run not made
            warnings.warn(line, stacklevel=3)
        tracker_id = self.restore() if cfg.resume else None
        tracker = Tracker(
            self.out,
            cfg.wandb_project,
            cfg.wandb_entity,
            config=asdict(cfg),
            run_id=tracker_id,
            active=self.world.is_main,
        )
        tracker.truncate_after(self.step)  # a fresh run starts an empty metrics.jsonl
        batches = self.batches()
        bar = progress(
            total=self.total_steps * cfg.batch_size,
            initial=self.step * cfg.batch_size,
            unit="tok",
            unit_scale=True,
            desc="train",
            disable=not self.world.is_main,  # one bar for the run, not one per rank
        )
        with closing(batches), interrupt_between_steps(self.world.size == 1) as interrupted:
            pending = None  # the last step's metrics, recorded once the next step is queued
            for batch in batches:
                if self.step == 0:
                    self.start_members(batch)
                metrics = self.train_step(batch)
                self.step += 1
                if pending is not None:
                    self.record(tracker, *pending)
                pending = (metrics, self.step)
                bar.update(cfg.batch_size)
                if interrupted():  # Ctrl-C came during the step: keep it, then stop
                    self.record(tracker, *pending)
                    self.save_checkpoint(tracker.run_id)
                    bar.close()
                    print(f"{cfg.out}: checkpoint of step {self.step} saved (--resume continues)",
                          file=sys.stderr)  # fmt: skip
                    raise KeyboardInterrupt
                if (
                    cfg.checkpoint_every
                    and self.step % cfg.checkpoint_every == 0
                    and self.step < self.total_steps
                ):
                    self.record(tracker, *pending)
                    pending = None
                    self.save_checkpoint(tracker.run_id)
            if pending is not None:
                self.record(tracker, *pending)
        bar.close()
        self.world.barrier()
        if self.step < self.total_steps:
            print(
                f"{cfg.out}: the data ran out after {self.step} of {self.total_steps} steps",
                file=sys.stderr,
            )
        if (self.world.is_main or self.world.splits_sweep) and self.last_values:
            for line in self.end_advice(self.last_values):  # each rank of a sweep on its own
                warnings.warn(line, stacklevel=3)
        # the SAEs first (a disk too full for the checkpoint keeps them), gathered whole from data
        # rank 0's latent shards into rank 0's host memory; a distributed sweep's by their ranks
        first = self.world.data_rank == 0
        saes = [m.shards.whole_sae(m.sae) if first else None for m in self.members]
        if self.world.is_main or self.world.splits_sweep:
            for m, whole in zip(self.members, saes, strict=True):
                whole.save(self.out / m.name)
        self.world.barrier()
        if self.world.is_main:
            for name in self.names:
                tracker.log_model(name, self.out / name)
        self.save_checkpoint(tracker.run_id)
        tracker.finish()
        self.world.barrier()
        return [
            m.sae if whole is None else whole for m, whole in zip(self.members, saes, strict=True)
        ]

    def batches(self) -> Iterator[dict[str, Tensor]]:
        """The run's batches from its current step on, read ahead by a worker thread where the
        host has a core to spare (always with CUDA: pinned there, on this rank's device)."""
        batches = islice(iter(self.source), self.step, self.total_steps)
        if not host_core_spare(self.device):
            return prefetched(batches, depth=0)
        if self.device.type != "cuda":
            return prefetched(batches)
        # a thread's current CUDA device starts at 0: give the worker the run's
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        setup = partial(torch.cuda.set_device, index)
        return prefetched(batches, prepare=pinned, setup=setup)

    def previous_run(self) -> list[str]:
        """What an earlier run left in the run directory (its metrics and checkpoint)."""
        return [name for name in ("metrics.jsonl", checkpoint.NAME) if (self.out / name).exists()]

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, run_id: str | None) -> None:
        """The run's state, as one process would write it (each dictionary of a distributed
        sweep gathered from the rank that trains it), so that any number of processes, or
        ranks of a sweep, resumes it; latent-sharded, data rank 0's shards each write their
        slices (checkpoint.py), and any number of shards resumes them."""
        self.saved_step = self.step  # on every rank, though data rank 0's alone write it
        if self.world.data_rank != 0:
            return
        states = [
            (m.name, *checkpoint.member_state(f"m{m.index}", m, host=self.world.splits_sweep))
            for m in self.members
        ]
        gathered = self.world.to_main(states)
        if gathered is None:  # a distributed sweep's rank: rank 0 writes its states
            return
        tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
        dims: dict[str, int] = {}
        meta: dict[str, Any] = {
            "step": self.step,
            "world_size": self.world.size,
            "data_ranks": self.world.data_size,
            "wandb_run_id": run_id,
            "members": {},
            "config": asdict(self.cfg),
            "data": self.source.identity,
        }
        for name, member_tensors, member_dims, member_meta in (
            s for rank in gathered for s in rank
        ):
            tensors.update(member_tensors)
            dims.update(member_dims)
            meta["members"][name] = member_meta
        shards = self.members[0].shards if self.members else WHOLE  # the world's latent group
        checkpoint.save(self.out, tensors, meta, dims, shards)

    def restore(self) -> str | None:
        """Load the run directory's checkpoint into the members; returns the W&B run id."""
        loaded = checkpoint.load(self.out)
        if loaded is None:
            print(f"{self.out}: no checkpoint to resume from; starting fresh", file=sys.stderr)
            return None
        stored, meta = loaded
        if sorted(meta["members"]) != sorted(self.names):
            raise ValueError(
                f"{self.out}: the checkpoint holds SAEs {sorted(meta['members'])}, this run {self.names}"
            )
        self.refuse_other_settings(meta)
        order = list(meta["members"])  # the sweep's order when written (its prefixes before 34)
        for m in self.members:
            member = {"prefix": f"m{order.index(m.name)}", **meta["members"][m.name]}
            checkpoint.restore_member(m, stored, member)
        torch.set_rng_state(stored["rng.torch"])
        self.step = self.saved_step = meta["step"]
        return meta.get("wandb_run_id")

    def refuse_other_settings(self, meta: dict[str, Any]) -> None:
        """A resumed run must train what the checkpoint trained: the same data in the same order
        and the same recipe, or it silently becomes neither run (the optimizer state keeps the
        old lr, the data position counts the old batches). Settings absent from an older
        checkpoint are not compared; total_tokens may grow (see RESUMABLE)."""
        saved, now = meta["config"], asdict(self.cfg)
        compared = (now.keys() & saved.keys()) - RESUMABLE - PER_SAE
        changed = {k: (saved[k], now[k]) for k in now if k in compared and saved[k] != now[k]}
        for m in self.members:
            spec = meta["members"][m.name].get("spec", {})
            in_effect = {  # a default resolved: what each trained, or would train, with
                k: (self.in_effect(m, k, v), self.in_effect(m, k, getattr(m.spec, k)))
                for k, v in spec.items()
            }
            changed.update({f"{m.name}.{k}": (a, b) for k, (a, b) in in_effect.items() if a != b})
        data, now_data = meta.get("data"), self.source.identity
        if isinstance(data, dict) and isinstance(now_data, dict) and "revision" in now_data:
            # a stream's identity before stop 34: its hookpoints (now compared per dictionary),
            # and no revision (the model as named, which is "")
            data = {"revision": "", **{k: v for k, v in data.items() if k != "hook"}}
        if data is not None and data != now_data:
            changed["data"] = (data, now_data)
        batch_wide = [m.name for m in self.members if m.sae.batch_wide]
        data_ranks = meta.get(  # checkpoints before stop 34 have none
            "data_ranks", meta.get("world_size", self.world.size) // saved.get("latent_shards", 1)
        )
        if batch_wide and data_ranks != self.world.data_size:
            # each data rank picks its batch top-k among its own rows (per-row SAEs do not care)
            changed[f"data-parallel ranks ({', '.join(batch_wide)} select within each)"] = (
                data_ranks, self.world.data_size,
            )  # fmt: skip
        if self.world.splits_sweep:  # each rank checks its own dictionaries; all refuse together
            changed = {k: v for part in self.world.share(changed) for k, v in part.items()}
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{self.out}: the checkpoint was trained with other settings ({listed}); resume "
                "with the checkpoint's, or start a new run (--overwrite or another --out)"
            )
        if saved.get("total_tokens", now["total_tokens"]) != now["total_tokens"]:
            warnings.warn(
                f"resuming with total_tokens={now['total_tokens']:,} (the checkpoint's run: "
                f"{saved['total_tokens']:,}): from step {meta['step']} the learning-rate schedule, "
                "the sparsity warm-up and the default dead_tokens follow the new length",
                stacklevel=4,
            )


def fit(data: Data | Source, **settings: Any) -> SAE | list[SAE]:
    """Train SAEs on a cache path/URL, straight from a model (a HarvestConfig: no cache), or on any
    iterable of [n, d_in] activation tensors. Every TrainConfig field is a keyword with a working
    default; `sweep=[{...}, ...]` trains several on the same batches. Returns the SAE, or the list
    of them for a sweep. Without `out`, the default run directory is scratch: each call replaces
    it; a run directory given by name is protected (`overwrite=True` replaces it)."""
    known = {f.name for f in fields(TrainConfig)}
    if unknown := sorted(set(settings) - known):
        raise TypeError(f"train.fit got unknown settings {unknown}; known: {sorted(known)}")
    settings.setdefault("overwrite", "out" not in settings)
    cfg = TrainConfig(**{"cache": str(data) if isinstance(data, (str, Path)) else "", **settings})
    saes = Trainer(cfg, data).run()
    return saes[0] if len(saes) == 1 else saes


def train_cli(cfg: TrainConfig) -> None:
    data = HarvestConfig(**cfg.text_options(), device=cfg.device) if cfg.stream else cfg.cache
    trainer = Trainer(cfg, data)
    trainer.run()
    for m in trainer.members:  # the name says the rule, width and hookpoints
        print(f"trained {m.name} ({m.sae.cfg.d_sae} latents)")
    print(f"dictionaries, checkpoint and metrics.jsonl in {cfg.out}")
