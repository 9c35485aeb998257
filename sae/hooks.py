"""Read and rewrite activations inside a running transformers model, with or without an SAE.

Every function here but `capture` is a context manager: hooks are attached on entry and removed
on exit, even when the forward pass raises. All of them are built on `edit`, which replaces the
activation at a hookpoint by f(activation).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from numbers import Integral

import torch
from torch import Tensor, nn

from sae.clt import CrossLayerTranscoder
from sae.lm import resolve_hook
from sae.models import SAE

Edit = Callable[[Tensor], Tensor]


@contextmanager
def edit(model: nn.Module, hook: str, fn: Edit) -> Iterator[None]:
    """Replace the activation at `hook` ([batch, seq, d] for the usual hookpoints) by fn(activation)."""
    point = resolve_hook(model, hook)
    if point.site == "input":

        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook_fn(module, args, output):
            if isinstance(output, tuple):  # attention modules return (output, weights)
                return (fn(output[0]), *output[1:])
            return fn(output)

        handle = point.module.register_forward_hook(hook_fn)
    try:
        yield
    finally:
        handle.remove()


class Recorded(dict):
    """{hook: activation}, naming a hook that has not fired rather than a bare KeyError."""

    def __missing__(self, hook: str) -> Tensor:
        raise KeyError(
            f"hookpoint {hook!r} has not fired: no forward pass has run inside `record`, or it "
            "ended before reaching the hook, or the hooked module is not called by this model"
        )


@contextmanager
def record(model: nn.Module, hooks: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Yield a dict that holds, after each forward pass, the detached activation at every hook."""
    acts = Recorded()

    def keep(name: str) -> Edit:
        def fn(x: Tensor) -> Tensor:
            acts[name] = x.detach()
            return x

        return fn

    with ExitStack() as stack:
        for name in hooks:
            stack.enter_context(edit(model, name, keep(name)))
        yield acts


class _Captured(Exception):
    """Raised from the last hook to fire: ends the forward pass early."""


def capture(model: nn.Module, hooks: list[str], **inputs: Tensor) -> dict[str, Tensor]:
    """Activations at every hook for one forward pass, which stops at the deepest of them: the
    blocks after it and the unembedding (a 49k-wide matmul for SmolLM2) are never run."""
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def fn(x: Tensor) -> Tensor:
            acts[name] = x
            if len(acts) == len(hooks):
                raise _Captured
            return x

        return fn

    with ExitStack() as stack:
        for name in hooks:
            stack.enter_context(edit(model, name, keep(name)))
        with suppress(_Captured):
            model(**inputs)
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise RuntimeError(f"hookpoints {missing} did not fire during the forward pass")
    return acts


@contextmanager
def _first_positions(model: nn.Module) -> Iterator[Callable[[Tensor], Tensor]]:
    """Yield a function from a hooked activation [batch, seq, ...] to a [batch, seq] mask of each
    row's true position 0 (its first attended token) within this forward call. With a KV cache
    (`generate`) a call holds only the new tokens, which lie past position 0; with left padding a
    row starts after its pads. The call's arguments say where those are, captured by a pre-hook on
    `model`: see _position_zero for the names each transformers release uses."""
    names = list(inspect.signature(model.forward).parameters)
    call: dict = {}

    def pre_hook(module, args, kwargs):
        call.clear()
        call.update(zip(names, args, strict=False), **kwargs)

    handles = [
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        # forgotten when the call ends: a later call of a submodule alone must not see it
        model.register_forward_hook(lambda *_: call.clear(), always_call=True),
    ]
    try:
        yield lambda x: _position_zero(call, x)
    finally:
        for handle in handles:
            handle.remove()


def _position_zero(call: dict, x: Tensor) -> Tensor:
    """[batch, seq] mask of each row's first attended token in the call's activation x, read from
    the first of these the call carries:
    - a 2-D attention_mask spanning the cached tokens too: a row's first 1 (left padding);
    - cache_position (transformers < 5.24): the call's absolute positions;
    - position_ids (generate passes them from 5.24 on, without a mask when nothing is padded);
    - the KV cache's length, passed as `cache` (5.24 on) or `past_key_values` (before).
    No argument at all means a fresh, unpadded call: column 0."""
    batch, seq = x.shape[:2]
    mask = call.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[1] >= seq:
        first = mask.to(x.device).long().argmax(1)  # a row's first 1 (0 when unpadded)
        positions = torch.arange(mask.shape[1] - seq, mask.shape[1], device=x.device)
        return positions[None, :] == first[:, None]
    for name in ("cache_position", "position_ids"):
        positions = call.get(name)
        if isinstance(positions, Tensor) and positions.shape[-1] == seq:
            return (positions.to(x.device) == 0).reshape(-1, seq).expand(batch, seq)
    positions = _past_length(call) + torch.arange(seq, device=x.device)
    return (positions == 0)[None, :].expand(batch, seq)


def _past_length(call: dict) -> int:
    """Tokens already in the KV cache: a Cache object's length, or a legacy tuple's key length."""
    past = call.get("cache")
    if past is None:
        past = call.get("past_key_values")
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


@contextmanager
def _edit_positions(model: nn.Module, hook: str, fn: Edit, skip_first: bool) -> Iterator[None]:
    """`edit` with fn applied to every position but each row's first when skip_first: position 0
    (BOS) is an attention sink with a ~7x larger norm that SAEs are not trained on, so it passes
    through untouched, wherever it falls in the call (see _first_positions)."""
    if not skip_first:
        with edit(model, hook, fn):
            yield
        return

    with _first_positions(model) as first_mask:

        def wrapped(x: Tensor) -> Tensor:
            if x.ndim < 3:
                return fn(x)
            return torch.where(first_mask(x)[..., None], x, fn(x))

        with edit(model, hook, wrapped):
            yield


@contextmanager
def splice(
    model: nn.Module,
    sae: SAE,
    hook: str | None = None,
    error_term: bool = False,
    latent_edit: Edit | None = None,
    skip_first: bool = True,
) -> Iterator[None]:
    """Replace the activation at the dictionary's output hook by its prediction: an SAE's
    reconstruction of that activation, or a transcoder's prediction from its input hook's
    activation in the same forward pass (the MLP's output from the MLP's input).

    With `error_term`, the error (activation - prediction) is added back, so the model runs
    exactly as clean while every latent is in the computation graph: editing latents
    (`latent_edit` maps codes to codes) then changes only what the edit changes. `hook` is where
    the prediction is written, by default the output hook (an SAE's hook_name).
    """
    with ExitStack() as stack:
        inputs = stack.enter_context(_inputs(model, sae)) if sae.cfg.is_transcoder else None

        def fn(y: Tensor) -> Tensor:
            x = y if inputs is None else inputs()
            z = sae.encode(x)
            y_hat = sae.predict(x, latent_edit(z) if latent_edit else z)
            if error_term:
                y_hat = y_hat + (y.to(y_hat.dtype) - (sae(x) if latent_edit else y_hat))
            return y_hat.to(y.dtype)

        stack.enter_context(_edit_positions(model, hook or sae.cfg.hook_name_out, fn, skip_first))
        yield


@contextmanager
def replace_mlps(
    model: nn.Module,
    dictionary: CrossLayerTranscoder | Sequence[SAE],
    error_term: bool = False,
    skip_first: bool = True,
) -> Iterator[None]:
    """The replacement model: every output hook of a cross-layer transcoder, or of a set of
    per-layer transcoders, replaced at once by its prediction from the inputs of this forward
    pass (so each layer reads what the replaced layers before it wrote). A CLT's layer j adds what
    the latents of layers 0..j write to it. `error_term` adds each output's error back (the model
    runs exactly as clean; attribution graphs keep these errors as nodes)."""
    if not isinstance(dictionary, CrossLayerTranscoder):
        with ExitStack() as stack:
            for t in dictionary:
                stack.enter_context(splice(model, t, error_term=error_term, skip_first=skip_first))
            yield
        return
    clt, codes = dictionary, {}

    def read(i: int) -> Edit:
        def fn(x: Tensor) -> Tensor:
            if i == 0:
                codes.clear()  # a new forward pass
            codes[i] = clt.encode_layer(i, x)
            return x

        return fn

    def write(j: int) -> Edit:
        def fn(y: Tensor) -> Tensor:
            if j not in codes:
                raise RuntimeError(
                    f"CLT output {clt.cfg.hook_names_out[j]} ran before its input "
                    f"{clt.cfg.hook_names[j]}: a CLT replaces outputs computed from its inputs"
                )
            y_hat = clt.decode_layer(j, [codes[i] for i in range(j + 1)])
            if error_term:
                y_hat = y_hat + (y.to(y_hat.dtype) - y_hat.detach())
            return y_hat.to(y.dtype)

        return fn

    with ExitStack() as stack:
        for j, (hook_in, hook_out) in enumerate(
            zip(clt.cfg.hook_names, clt.cfg.hook_names_out, strict=True)
        ):
            stack.enter_context(edit(model, hook_in, read(j)))
            stack.enter_context(_edit_positions(model, hook_out, write(j), skip_first))
        yield


@contextmanager
def _inputs(model: nn.Module, sae: SAE) -> Iterator[Callable[[], Tensor]]:
    """Yield a function giving the transcoder's input activation of the current forward pass, for
    its output hook (the input hook fires first: the MLP's pre-hook, then its output). An output
    reached without its input is a splice that cannot work, named rather than misread."""
    seen: list[Tensor] = []

    def keep(x: Tensor) -> Tensor:
        seen.append(x)
        return x

    def take() -> Tensor:
        if not seen:
            raise RuntimeError(
                f"transcoder {sae.cfg.hook_name} -> {sae.cfg.hook_name_out}: the output hook ran "
                "before the input hook; a transcoder replaces an output computed from its input "
                "(an MLP's output from the MLP's input)"
            )
        return seen.pop()

    with edit(model, sae.cfg.hook_name, keep):
        yield take


@contextmanager
def ablate(
    model: nn.Module,
    sae: SAE,
    latents: Sequence[int],
    hook: str | None = None,
    skip_first: bool = True,
) -> Iterator[None]:
    """Zero the given latents, keeping the SAE's error term so nothing else changes."""
    latents = list(latents)
    _check_latents(sae, latents)
    index = torch.as_tensor(latents, dtype=torch.long)

    def zero(z: Tensor) -> Tensor:
        z = z.clone()
        z[..., index.to(z.device)] = 0
        return z

    with splice(model, sae, hook, error_term=True, latent_edit=zero, skip_first=skip_first):
        yield


@contextmanager
def steer(
    model: nn.Module,
    sae: SAE,
    latent: int,
    scale: float,
    hook: str | None = None,
    skip_first: bool = True,
) -> Iterator[None]:
    """Add scale times the latent's decoder direction to the activation at every position of the
    output hook (an SAE's own; a transcoder's output). The direction is W_dec[latent] in the
    model's units (normalization undone)."""
    _check_latents(sae, [latent])
    if not math.isfinite(scale):
        raise ValueError(f"steering scale must be finite, got {scale}")
    direction = (sae.W_dec[latent] / sae.output_scale).detach()

    def fn(x: Tensor) -> Tensor:
        return x + scale * direction.to(x.dtype)

    with _edit_positions(model, hook or sae.cfg.hook_name_out, fn, skip_first):
        yield


def _check_latents(sae: SAE, latents: list[int]) -> None:
    """Refuse latent numbers the SAE does not have (a negative one would index from the end)."""
    if wrong := [i for i in latents if isinstance(i, bool) or not isinstance(i, Integral)]:
        raise TypeError(f"latents are integers 0..{sae.cfg.d_sae - 1}, got {wrong!r}")
    if bad := [i for i in latents if not 0 <= i < sae.cfg.d_sae]:
        raise ValueError(f"latents {bad} out of range: this SAE has latents 0..{sae.cfg.d_sae - 1}")
