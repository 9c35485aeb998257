"""Options of the train/ stages as dataclasses: the `sae` CLI is generated from these, and YAML
config files use the same names. Kept free of heavy imports so `sae --help` stays instant."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

CACHE_DTYPES = ("float32", "bfloat16", "float16")
DECODER_INITS = ("auto", "random", "zero")
ENCODER_INITS = ("auto", "tied", "fitted")


@dataclass
class TextOptions:
    """Which LM runs on which text: declared once for harvest, streaming training, eval and the
    dashboard, so each flag means the same everywhere."""

    model: str = "smollm2-135m"
    """Model: smollm2-135m (embedded), all-minilm-l6-v2 (embedded), an HF id or a local folder."""
    revision: str = ""
    """The model's revision: a hub branch, tag or commit (Pythia's step8000), or a local folder
    holding a checkpoint; empty: the model as named."""
    dataset: str = "shakespeare"
    """Text: shakespeare (embedded), a local text file or folder, or a `datasets` name."""
    split: str = "train"
    """Split: train/test/all for shakespeare (test = 4 held-out plays), or a `datasets` split."""
    text_column: str = "text"
    """Text column, for `datasets` datasets."""
    context_size: int = 128
    """Tokens per window, BOS included."""

    def text_options(self) -> dict:
        """These fields' values (to build another stage's config from this one's)."""
        return {f.name: getattr(self, f.name) for f in fields(TextOptions)}


@dataclass
class HarvestConfig(TextOptions):
    """Run the model over a text dataset and store activations at one or more hookpoints."""

    hook: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    """Hookpoints to capture in the same forward pass (repeat the flag for several)."""
    tokens: int = 1_000_000
    """Rows (tokens, BOS excluded) to harvest; stops early, with a note, if the dataset ends."""
    out: str = "runs/demo/cache"
    """Cache directory: a local path or an fsspec URL such as s3://bucket/prefix."""
    batch_size: int = 8
    """Windows per forward pass."""
    dtype: str = "bfloat16"
    """The cache's dtype: float32, bfloat16 or float16."""
    precision: str = "auto"
    """Forward precision (autocast): float32, bfloat16, float16, or auto (the cache dtype where the
    device computes it natively, else float32)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    pack: bool = True
    """Pack documents across window boundaries; --no-pack starts each document in a new window."""
    seed: int = 0
    """Seed of the window order."""
    shard_windows: int = 256
    """Windows per shard (a multiple of batch_size); a restarted harvest resumes at a shard boundary."""

    def __post_init__(self) -> None:
        if not self.hook:
            raise ValueError("at least one --hook is needed")
        if repeated := sorted({h for h in self.hook if self.hook.count(h) > 1}):
            raise ValueError(f"--hook {', '.join(repeated)} given more than once")
        if not all(h.strip() for h in self.hook):
            raise ValueError("--hook is empty: name a hookpoint such as blocks.6.hook_resid_post")
        for name in ("tokens", "batch_size", "context_size", "shard_windows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shard_windows % self.batch_size:
            raise ValueError(
                f"shard_windows={self.shard_windows} must be a multiple of batch_size={self.batch_size}"
            )
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {CACHE_DTYPES}")
        if self.precision not in ("auto", *CACHE_DTYPES):
            raise ValueError(
                f"precision {self.precision!r} is not one of {('auto', *CACHE_DTYPES)}"
            )


JUMPRELU_ONLY = {
    "target_l0": "aims a JumpReLU's L0 penalty at k; {} has none (top-k rules set L0 by k, "
    "ReLU-L1 and Gated penalise L1)",
    "pre_act_coefficient": "pulls a JumpReLU's latents up to their thresholds; {} has no trained "
    "threshold (AuxK revives a top-k rule's dead latents)",
}
"""The settings of a rule with a trained threshold (SAE.aims_l0), and what each does, for the
error that refuses them elsewhere."""


@dataclass
class SAESpec:
    """One SAE of a training run. A sweep file lists several; unset fields take the run's values."""

    architecture: str = "topk"
    """standard, topk, batchtopk, jumprelu, gated or matryoshka_batchtopk."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in, unless d_sae is set."""
    d_sae: int = 0
    """Number of latents (0: from expansion_factor)."""
    k: int = 32
    """Active latents per row (topk) or on average (batchtopk, matryoshka)."""
    matryoshka_widths: list[int] = field(default_factory=list)
    """Nested prefix sizes for matryoshka_batchtopk, increasing and ending at d_sae (empty: four
    prefixes doubling up to d_sae)."""
    lr: float = 0.0
    """Adam learning rate; 0 picks it from the width and the run's length (train/schedule.py:
    4e-3 x (4096 / d_sae)^0.1 x (100 / steps)^0.25, fitted to a sweep on SmolLM2; 1.4 times
    that for a BatchTopK SAE, times (4608 / d_sae)^0.15 beyond 4608 latents; 2 times for a ReLU-L1
    SAE; 3 times for a TopK transcoder, 2.5 times for a BatchTopK one, 1.4 times for a ReLU-L1
    one)."""
    sparsity_coefficient: float = 0.0
    """L1 weight (standard, gated) or L0 weight (jumprelu); 0 picks the architecture's default
    for the run's length (a longer run needs less penalty for the same L0: SAE.default_coefficient)
    and, for ReLU-L1, the width; a transcoder's its own (JumpReLU 0.13 at 97 steps, where the SAE's
    ended at L0 18, growing to 0.26 at 354 as its code grows denser; ReLU-L1 1.17, 1.11 at 354)."""
    target_l0: bool | None = None
    """JumpReLU: penalise the L0's squared distance from k, (L0 - k)^2 / k, instead of the L0
    itself, so that L0 ends near k at any length without a weight tuned to it (default weight
    TARGET_L0_COEFFICIENT); the L0 penalty only thins the code, and where the reconstruction
    thins it too (a JumpReLU CLT: L0 480 -> 72) nothing brings it back (docs/training.md). Unset:
    the dictionary's default, aimed at k for a JumpReLU CLT (sae.clt.AIMED_AT_K), the L0 penalty
    for any other JumpReLU."""
    pre_act_coefficient: float = -1.0
    """JumpReLU: weight of Anthropic's pre-activation loss, which pulls every latent's
    pre-activations up toward its threshold, so that a latent that stopped firing is brought back
    (JumpReLUSAE.pre_act_loss; measured in docs/training.md). Below 0: the rule's default (1e-3
    for a JumpReLU SAE, a CLT or a crosscoder; none for a transcoder at one hookpoint); 0: off."""
    hook: str = ""
    """Hookpoint to train on (empty: the cache's only one)."""
    hook_out: str = ""
    """Hookpoint to predict (empty: `hook`, an SAE); another one trains a transcoder, e.g.
    --hook blocks.6.mlp.hook_in --hook-out blocks.6.hook_mlp_out."""
    skip: bool = False
    """Add a linear skip path from input to output (a skip transcoder)."""
    decoder_init: str = "auto"
    """How the decoder starts: random (unit rows in random directions; an SAE's encoder starts as
    their transpose), zero (each latent's row set by its first gradients, as sparsify's
    transcoders start), or auto: zero for a TopK, JumpReLU or ReLU-L1 transcoder at half the
    default learning rate or faster, where it measured better (docs/transcoders.md), else random."""
    encoder_init: str = "auto"
    """How the encoder starts: tied (an SAE's: its decoder's transpose, as SAELens and Gao et al.
    start; a transcoder's: random unit columns), fitted (that, times the one number that best
    fits the first batch's reconstruction; a JumpReLU's thresholds and a ReLU-L1's biases also
    start where the batch's L0 is k; a CLT's, layer by layer, with no scale), or auto: fitted for
    a TopK, BatchTopK, Matryoshka, ReLU-L1 or JumpReLU SAE, a JumpReLU or ReLU-L1 transcoder and
    a CLT, where it measured better (docs/training.md, docs/transcoders.md), else tied."""
    layers: str = ""
    """Train one dictionary over these layers (0-29, or 0,4,8): `hook` names the hookpoint kind
    read at each (hook_resid_post: a crosscoder), and `hook_out` the kind written (mlp.hook_in ->
    hook_mlp_out: a cross-layer transcoder)."""
    name: str = ""
    """Directory name under the run's output (empty: derived from the settings)."""

    def layer_numbers(self) -> list[int]:
        """The layers of `layers` (a-b ranges and commas), in order; empty for one hookpoint."""
        numbers: list[int] = []
        for part in filter(None, self.layers.replace(" ", "").split(",")):
            first, _, last = part.partition("-")
            if not (first.isdigit() and (last or first).isdigit()) or int(last or first) < int(
                first
            ):
                raise ValueError(f"layers {self.layers!r}: expected ranges such as 0-29 or 0,4,8")
            numbers += range(int(first), int(last or first) + 1)
        if sorted(set(numbers)) != numbers:
            raise ValueError(f"layers {self.layers!r} repeat or go backwards: {numbers}")
        return numbers

    def inputs(self) -> list[str]:
        """The hookpoints it reads, in order (one per layer for a cross-layer transcoder)."""
        return self._per_layer(self.hook)

    def outputs(self) -> list[str]:
        """The hookpoints it predicts (`hook_out`, else its inputs: an SAE)."""
        return self._per_layer(self.hook_out or self.hook)

    def _per_layer(self, hook: str) -> list[str]:
        layers = self.layer_numbers()
        if not layers:
            return [hook]
        if hook.startswith("blocks."):
            raise ValueError(
                f"with --layers, --hook and --hook-out name a hookpoint kind such as mlp.hook_in "
                f"(read at every layer), not one hookpoint ({hook!r})"
            )
        return [f"blocks.{layer}.{hook}" for layer in layers]

    def hooks(self) -> set[str]:
        """The hookpoints it reads: its inputs, and a transcoder's outputs."""
        return set(self.inputs()) | set(self.outputs())


@dataclass
class TrainConfig(SAESpec, TextOptions):
    """Train one or more SAEs on the same batches of a harvested activation cache, or straight
    from a model (--stream: --model's forward passes on --dataset)."""

    cache: str = "runs/demo/cache"
    """Activation cache (local path or fsspec URL) written by `sae harvest`."""
    out: str = "runs/demo/train"
    """Run directory: one folder per SAE, checkpoints, metrics.jsonl."""
    total_tokens: int = 2_000_000
    """Rows to train on (the cache is re-read in a new order if it is shorter)."""
    batch_size: int = 4096
    """Rows per optimizer step."""
    warmup_steps: int = -1
    """Linear learning-rate warm-up steps (-1: 5% of the run, at least 5 and at most 1000)."""
    decay_fraction: float = 0.2
    """Final fraction of training over which the learning rate decays linearly to zero."""
    sparsity_warmup_fraction: float = 0.05
    """Fraction of training over which L1/L0 penalties ramp up from zero."""
    aux_coefficient: float = 1 / 32
    """AuxK loss weight for top-k styles."""
    dead_tokens: int = 0
    """A latent that has not fired in this many tokens is dead (0: total_tokens / 20, at most 10M)."""
    b_dec_init: str = "geometric_median"
    """b_dec at the geometric_median or mean of the first batch's targets, or zeros; a CLT's
    and a top-k transcoder's input centre at the same statistic of its inputs (zeros: uncentred)."""
    normalize: bool = True
    """Scale inputs to mean norm sqrt(d_in) with the cache's statistics (folded into the saved SAE)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    resume: bool = False
    """Continue from the run directory's checkpoint."""
    overwrite: bool = False
    """Replace a run already in `out`; without it (or --resume) such a directory is refused."""
    wandb_project: str = ""
    """Log to this W&B project (offline when no API key is set); empty: no W&B."""
    wandb_entity: str = ""
    """W&B entity (user or team)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    latent_shards: int = 1
    """Split each SAE's latents over this many ranks (torchrun), for dictionaries too big for one
    device: the processes form a grid of data ranks x latent shards (docs/training.md)."""
    distribute_sweep: bool = False
    """Under torchrun, train each dictionary of the sweep on one rank (ranks balanced by the
    dictionaries' training memory), every rank on whole batches and only its dictionaries'
    hookpoints, instead of every rank training every dictionary on its part of each batch: for
    sweeps of many dictionaries or hookpoints (sparsify's --distribute_modules)."""
    autocast: bool = False
    """Run the SAEs' matmuls in bfloat16 (torch.autocast, as SAELens's `autocast`); parameters,
    Adam moments and the sparse gradient sums stay float32."""
    stream: bool = False
    """Train straight from --model's forward passes on --dataset (--split, --text-column,
    --context-size) instead of a cache: no disk; resuming recomputes the skipped activations."""
    sweep: list[dict] = field(default_factory=list, metadata={"cli": False})
    """SAEs to train together, each a mapping of SAESpec fields (from a --config YAML file)."""

    def specs(self) -> list[SAESpec]:
        """The SAEs of the run: the sweep's entries over the run-level SAE fields."""
        from dataclasses import fields
        from typing import get_type_hints

        from sae.cli import as_option_type, item_type

        base = {f.name: getattr(self, f.name) for f in fields(SAESpec)}
        hints = get_type_hints(SAESpec)
        entries = self.sweep or [{}]
        specs = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError(f"sweep entries are mappings of SAE fields, got {entry!r}")
            unknown = sorted(set(entry) - set(base))
            if unknown:
                raise ValueError(
                    f"sweep entry {entry}: unknown SAE fields {unknown}; known: {sorted(base)}"
                )
            typed = {
                k: as_option_type(v, base[k], f"sweep entry {entry}: {k}", item_type(hints[k]))
                for k, v in entry.items()
            }
            specs.append(SAESpec(**{**base, **typed}))
        return specs

    def __post_init__(self) -> None:
        for name in ("total_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.total_tokens < self.batch_size:  # it trained 0 steps and saved a random SAE
            raise ValueError(
                f"total_tokens={self.total_tokens} is less than one batch (batch_size="
                f"{self.batch_size}): the run would train no step; raise --total-tokens or "
                "lower --batch-size"
            )
        if self.warmup_steps < -1:
            raise ValueError(
                f"warmup_steps must be -1 (5% of the run) or more, got {self.warmup_steps}"
            )
        if self.latent_shards < 1:
            raise ValueError(f"latent_shards must be at least 1, got {self.latent_shards}")
        if self.distribute_sweep and self.latent_shards > 1:
            raise ValueError(
                "--distribute-sweep puts each dictionary whole on one rank and --latent-shards "
                f"{self.latent_shards} splits each over ranks: choose one"
            )
        from sae.models import REGISTRY as rules  # the rules' traits live beside their classes

        for name in ("dead_tokens", "checkpoint_every", "aux_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("decay_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(
                f"b_dec_init {self.b_dec_init!r} is not geometric_median, mean or zeros"
            )
        for spec in self.specs():
            if spec.name and (Path(spec.name).is_absolute() or ".." in Path(spec.name).parts):
                raise ValueError(
                    f"name {spec.name!r} would write outside --out: give a plain folder name"
                )
            if spec.layers and not spec.hook:
                raise ValueError(
                    f"a dictionary over layers {spec.layers!r} needs --hook: the hookpoint kind it "
                    "reads at each (hook_resid_post for a crosscoder; mlp.hook_in with --hook-out "
                    "hook_mlp_out for a cross-layer transcoder)"
                )
            spec.hooks()  # a malformed --layers, named now
            if spec.expansion_factor <= 0 and not spec.d_sae:
                raise ValueError(f"expansion_factor must be positive, got {spec.expansion_factor}")
            for name, choices in (("decoder_init", DECODER_INITS), ("encoder_init", ENCODER_INITS)):
                if (value := getattr(spec, name)) not in choices:
                    raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
            if spec.layers and not spec.hook_out and spec.encoder_init == "fitted":
                raise ValueError(
                    "encoder_init fitted starts an SAE, a transcoder or a cross-layer "
                    f"transcoder, not a crosscoder (over {spec.layers!r}): leave it auto (tied)"
                )
            for name in ("lr", "sparsity_coefficient"):
                if getattr(spec, name) < 0:
                    raise ValueError(f"{name} must be non-negative, got {getattr(spec, name)}")
            thresholded = getattr(rules.get(spec.architecture), "aims_l0", True)
            for name, does in JUMPRELU_ONLY.items():
                asked = getattr(spec, name) or 0  # target_l0 True, or a weight; unset: None
                if asked > 0 and not thresholded:
                    raise ValueError(f"{name} {does.format(spec.architecture)}")
