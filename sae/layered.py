"""What the dictionaries over several hookpoints share: sae/clt.py's cross-layer transcoders and
sae/crosscoder.py's crosscoders. Each is built from sae.models dictionaries (its `parts`), so every
sparsity rule keeps its own encoder and training recipe; around them it holds one scale per
hookpoint, reads and writes its hookpoints concatenated in order ([..., n * d]), and saves
cfg.json with `dictionary: <kind>` beside sae_weights.safetensors (scales folded in).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae.config import DTYPES, NORMALIZATIONS, ConfigError
from sae.models import SAE, LossOutput

KINDS: dict[str, type[LayeredDictionary]] = {}
"""The kinds by cfg.json's `dictionary` key (a plain SAE's cfg.json has none)."""


@dataclass
class LayersConfig:
    """The fields every dictionary over several hookpoints has."""

    architecture: str = "topk"
    """The sparsity rule (sae.models' names)."""
    hook_names: list[str] = field(default_factory=list)
    """The hookpoints it reads, in order (one per layer)."""
    d_in: int = 576
    """Width of each hookpoint it reads."""
    d_sae: int = 4608
    """Number of latents (a CLT: per layer)."""
    k: int = 32
    """Active latents per row (topk), or on average (batchtopk)."""
    normalize_activations: str = "none"
    """As SAEConfig's: expected_average_only_in scales each hookpoint by its own factor."""
    norm_scaling_factors: list[float] = field(default_factory=list)
    """Scale of each hookpoint it reads (empty: 1)."""
    model_name: str = ""
    model_revision: str = ""
    context_size: int = 128
    prepend_bos: bool = True
    dataset_path: str = ""
    dtype: str = "float32"
    device: str = "cpu"

    kind: ClassVar[str]
    scale_fields: ClassVar[tuple[str, ...]] = ("norm_scaling_factors",)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(f"normalize_activations must be one of {NORMALIZATIONS}")
        n = self.n_layers
        for name in self.scale_fields:
            scales = getattr(self, name) or [1.0] * n
            if len(scales) != n or not all(s > 0 for s in scales):
                raise ConfigError(f"{name} should hold {n} positive scales, got {scales}")
            setattr(self, name, [float(s) for s in scales])
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def n_layers(self) -> int:
        return len(self.hook_names)

    def to_dict(self) -> dict[str, Any]:
        return {"dictionary": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LayersConfig:
        data = {k: v for k, v in data.items() if k != "dictionary"}
        if unknown := sorted(set(data) - {f.name for f in fields(cls)}):
            raise ConfigError(f"{source}: unknown {cls.__name__} keys {unknown}")
        return cls(**data)


class LayeredDictionary(nn.Module):
    """The trainer's view of a dictionary (the members an SAE has), delegated to the parts."""

    kind: ClassVar[str]
    config: ClassVar[type[LayersConfig]]
    cfg: LayersConfig
    fitted_start: ClassVar[bool] = False
    """Whether training starts it from fit_code_scale under encoder_init auto (as SAE's)."""
    centres_input: ClassVar[bool] = False
    """Whether the first batch sets its input centre (centre_inputs_, as SAE's)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.kind] = cls

    @property
    def parts(self) -> list[SAE]:
        raise NotImplementedError

    def default_coefficient(self, steps: int, d_sae: int, transcoder: bool = False) -> float:
        """The rule's SAE weight: its parts' transcoder weight was measured at one hookpoint with
        a start a CLT does not take (a zero decoder), and where a CLT's rule has one of its own,
        the CLT says so (sae.clt.COEFFICIENTS)."""
        return self.parts[0].default_coefficient(steps, d_sae)

    def default_pre_act(self, transcoder: bool = False) -> float:
        """The rule's SAE weight (a JumpReLU CLT gained at 3e-3, docs/transcoders.md)."""
        return self.parts[0].default_pre_act()

    @property
    def default_target_l0(self) -> bool:
        """Whether training aims its penalty at L0 k when SAESpec.target_l0 is unset (SAE's)."""
        return False

    def training_advice(
        self, l0: float, coefficient: float, total_steps: int, target_l0: bool = False
    ) -> list[str]:
        """The parts' advice, with the L0 of one part (a CLT's L0 sums its layers')."""
        part_l0 = l0 / len(self.parts)
        return self.parts[0].training_advice(part_l0, coefficient, total_steps, target_l0)

    @classmethod
    def rate_factor(cls, transcoder: bool, d_sae: int) -> float:
        """The rule at 1x: the rules' own factors (BatchTopK SAEs' 1.4, TopK and BatchTopK transcoders'
        3 and 2.5: decisions 67, 78) were swept at one hookpoint, and a CLT's or crosscoder's was not."""
        return 1.0

    @property
    def batch_wide(self) -> bool:
        return self.parts[0].batch_wide

    def per_layer(self, x: Tensor, width: int, what: str) -> Tensor:
        """[..., n * width] -> [..., n, width] in the parameters' dtype, refusing another width."""
        n = self.cfg.n_layers
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != n * width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{self.kind} over {n} hookpoints expects {what} concatenated over them, last "
                f"dimension {n} * {width} = {n * width}; got {shape}"
            )
        return x.to(self.parts[0].W_enc.dtype).unflatten(-1, (n, width))

    def layer_scales(self, name: str = "norm_scaling_factors") -> Tensor:
        """One scale per hookpoint [n] (1 unless normalize_activations is on)."""
        on = self.cfg.normalize_activations != "none"
        scales = getattr(self.cfg, name) if on else [1.0] * self.cfg.n_layers
        return self.parts[0].W_enc.new_tensor(scales)

    @torch.no_grad()
    def start_training(self) -> None:
        for part in self.parts:
            part.start_training()

    @torch.no_grad()
    def reach_step(self, step: int, total_steps: int) -> None:
        for part in self.parts:
            part.reach_step(step, total_steps)

    @torch.no_grad()
    def before_step(self) -> None:
        for part in self.parts:
            part.before_step()

    @torch.no_grad()
    def after_step(self, out: LossOutput) -> None:
        for part, own in zip(self.parts, out.layers or [out], strict=True):
            part.after_step(own)

    def folded_state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """cfg.json (`dictionary`: the kind, our fields, scales folded to 1) and
        sae_weights.safetensors (folded_state_dict)."""
        from sae.io import CFG_FILE, WEIGHTS_FILE, write_tensors, write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_tensors(path / WEIGHTS_FILE, self.folded_state_dict())
        ones = [1.0] * self.cfg.n_layers
        cfg = {**self.cfg.to_dict(), "normalize_activations": "none",
               **dict.fromkeys(self.cfg.scale_fields, ones),
               "dtype": str(self.parts[0].W_enc.dtype).removeprefix("torch."), "device": "cpu"}  # fmt: skip
        write_text(path / CFG_FILE, json.dumps(cfg, indent=2))
        return path


def load(
    path: Path,
    cfg_dict: dict[str, Any],
    state: dict[str, Tensor],
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> LayeredDictionary:
    """A saved dictionary of one of KINDS from its cfg.json contents and weights, refusing tensors
    that do not fit the config."""
    from sae.io import FormatError, refuse_nonfinite, with_folded_zeros

    source, kind = str(path), cfg_dict.get("dictionary")
    if kind not in KINDS:
        raise FormatError(f"{source}: unknown dictionary kind {kind!r}; known: {sorted(KINDS)}")
    cls = KINDS[kind]
    try:
        cfg = cls.config.from_dict({**cfg_dict, "device": "meta"}, source)
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{source}: {e}") from e
    expected = {k: tuple(v.shape) for k, v in cls(cfg).folded_state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))
        raise FormatError(
            f"{source}: the weights do not fit the {kind} its cfg.json describes: {wrong}"
        )
    refuse_nonfinite(state, source)
    dtype = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    cfg.dtype, cfg.device = dtype, device
    dictionary = cls(cfg)
    loaded = {k: v.to(device=device, dtype=DTYPES[dtype]) for k, v in state.items()}
    dictionary.load_state_dict(with_folded_zeros(dictionary, loaded))
    return dictionary
