"""Splice, ablate, steer and record with an SAE inside the real SmolLM2."""

import pytest
import torch

import sae
from sae.hooks import ablate, record, splice, steer

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tok = smollm2
    text = (
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
    )
    return torch.tensor([[tok.bos_token_id] + tok(text).input_ids])


@pytest.fixture(scope="module")
def clean(smollm2, ids):
    with torch.no_grad():
        return smollm2[0](ids).logits


@pytest.fixture(scope="module")
def topk_sae(smollm2, ids):
    """A TopK SAE whose b_dec sits at the data mean, so its codes are not degenerate."""
    torch.manual_seed(0)
    d = sae.create("topk", d_in=576, d_sae=2304, k=32, hook_name=HOOK)
    with torch.no_grad(), record(smollm2[0], [HOOK]) as acts:
        smollm2[0](ids)
    with torch.no_grad():
        d.b_dec.copy_(acts[HOOK][0, 1:].mean(0))
    return d


@torch.no_grad()
def test_splice_with_error_term_gives_clean_logits(smollm2, ids, clean, topk_sae):
    with splice(smollm2[0], topk_sae, error_term=True):
        logits = smollm2[0](ids).logits
    torch.testing.assert_close(logits, clean, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_splice_without_error_term_changes_logits(smollm2, ids, clean, topk_sae):
    with splice(smollm2[0], topk_sae), record(smollm2[0], [HOOK]) as acts:
        logits = smollm2[0](ids).logits
    assert (logits - clean).abs().max() > 1.0
    # what the model saw at the hook is the SAE's reconstruction, except at BOS
    with record(smollm2[0], [HOOK]) as clean_acts:
        smollm2[0](ids)
    torch.testing.assert_close(acts[HOOK][:, 1:], topk_sae(clean_acts[HOOK][:, 1:]))
    torch.testing.assert_close(acts[HOOK][:, :1], clean_acts[HOOK][:, :1])


@torch.no_grad()
def test_hooks_are_removed_on_exit_even_after_errors(smollm2, ids, clean, topk_sae):
    with pytest.raises(RuntimeError), splice(smollm2[0], topk_sae):
        raise RuntimeError("boom")
    torch.testing.assert_close(smollm2[0](ids).logits, clean)


@torch.no_grad()
def test_ablating_inactive_latents_changes_nothing_and_active_ones_do(
    smollm2, ids, clean, topk_sae
):
    with record(smollm2[0], [HOOK]) as acts:
        smollm2[0](ids)
    z = topk_sae.encode(acts[HOOK][:, 1:])
    active = z.flatten(0, 1).ne(0).any(0)
    inactive = torch.nonzero(~active).flatten()[:50].tolist()
    with ablate(smollm2[0], topk_sae, inactive):
        torch.testing.assert_close(smollm2[0](ids).logits, clean, atol=1e-4, rtol=1e-4)
    with ablate(smollm2[0], topk_sae, torch.nonzero(active).flatten().tolist()):
        assert (smollm2[0](ids).logits - clean).abs().max() > 0.1


@torch.no_grad()
def test_steering_raises_the_latent_downstream(smollm2, ids, topk_sae):
    model = smollm2[0]
    downstream = "blocks.7.hook_resid_pre"  # the next block's input: after the edit at block 6
    with record(model, [downstream]) as acts:
        model(ids)
    before = topk_sae.pre_acts(acts[downstream][:, 1:])
    latent = int(before.mean((0, 1)).argmin())  # the least active latent
    with (
        steer(model, topk_sae, latent, scale=40.0),
        record(model, [downstream, "blocks.12.hook_resid_post"]) as steered,
    ):
        model(ids)
    after = topk_sae.pre_acts(steered[downstream][:, 1:])
    torch.testing.assert_close(
        after[..., latent] - before[..., latent],
        torch.full_like(before[..., latent], 40.0),
        atol=1e-3,
        rtol=1e-4,
    )
    assert (topk_sae.encode(steered[downstream][:, 1:])[..., latent] > 0).all(), (
        "steered latent should fire everywhere"
    )
    # and its direction persists further down the residual stream
    direction = topk_sae.W_dec[latent]
    with record(model, ["blocks.12.hook_resid_post"]) as plain:
        model(ids)
    gain = (
        steered["blocks.12.hook_resid_post"][0, 1:] - plain["blocks.12.hook_resid_post"][0, 1:]
    ) @ direction
    assert (gain > 0.2 * 40).all(), "at least a fifth of the push should survive six blocks"


@torch.no_grad()
def test_splice_into_bf16_model_with_fp32_sae(smollm2, ids, topk_sae):
    model = smollm2[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), splice(model, topk_sae, error_term=True):
        logits = model(ids).logits
    assert logits.isfinite().all()


# -- where position 0 falls: a KV cache and left padding ------------------------------------------
TINY_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_llama():
    """A random two-layer Llama: generation with and without a cache in well under a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)  # fmt: skip
    return LlamaForCausalLM(config).eval()


EDITS = {
    "steer": lambda model, d: steer(model, d, latent=3, scale=40.0),
    "splice": lambda model, d: splice(model, d),
}


@pytest.mark.parametrize("edit", EDITS)
@torch.no_grad()
def test_cached_generation_edits_every_new_token(tiny_llama, edit):
    """With a KV cache each call after the prompt holds one new token, at a position past 0: it is
    edited like the same token in a full forward pass (it used to be taken for position 0 and left
    alone, so cached and uncached generation parted ways)."""
    d = sae.create("topk", d_in=64, d_sae=256, k=8, hook_name=TINY_HOOK)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = tiny_llama.generate(ids, **greedy)
    with EDITS[edit](tiny_llama, d):
        cached = tiny_llama.generate(ids, use_cache=True, **greedy)
        uncached = tiny_llama.generate(ids, use_cache=False, **greedy)
        full = tiny_llama(cached[:, :-1]).logits[:, -1]
        prefix = tiny_llama(cached[:, :-2], use_cache=True)  # then one step with no mask given
        step = tiny_llama(cached[:, -2:-1], past_key_values=prefix.past_key_values).logits[:, -1]
    assert not torch.equal(cached, plain), "the edit should change what is generated"
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("edit", EDITS)
@torch.no_grad()
def test_left_padded_rows_are_edited_like_unpadded_ones(tiny_llama, edit):
    """A left-padded row's position 0 is its first attended token, not column 0."""
    d = sae.create("topk", d_in=64, d_sae=256, k=8, hook_name=TINY_HOOK)
    long, short = [1, 5, 9, 17, 33, 40, 41, 42], [1, 7, 8, 9]
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with EDITS[edit](tiny_llama, d):
        alone = tiny_llama(torch.tensor([short])).logits[0]
        batched = tiny_llama(ids, attention_mask=mask, position_ids=positions).logits[1, pad:]
    assert (alone - tiny_llama(torch.tensor([short])).logits[0]).abs().max() > 0.01
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_later_call_of_the_base_model_alone_does_not_see_the_last_calls_mask(tiny_llama):
    """What a call's mask says holds for that call only: the base model called on its own after a
    padded call of the whole model edits as the whole model would."""
    d = sae.create("topk", d_in=64, d_sae=256, k=8, hook_name=TINY_HOOK)
    ids, mask = torch.tensor([[0, 0, 1, 7], [1, 5, 9, 17]]), torch.tensor([[0, 0, 1, 1], [1] * 4])
    short = torch.tensor([[1, 7, 8]])  # no longer than the padded call
    with EDITS["steer"](tiny_llama, d):
        tiny_llama(ids, attention_mask=mask)
        alone = tiny_llama.model(short).last_hidden_state
        whole = tiny_llama(short, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(alone, whole)


class _Stream(torch.nn.Module):
    """The smallest model a hook can sit in: embeddings, then one hooked layer. Its forward takes
    whatever arguments a transformers release passes, so each naming is tried on every release."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 64)
        self.layer = torch.nn.Identity()

    def forward(self, input_ids, **kwargs):
        return self.layer(self.embed(input_ids))


def _cache_of(length: int):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, length, 8), torch.zeros(2, 2, length, 8), 0)
    return cache


# the call's arguments -> which [row, column] of its 3 new tokens is each row's position 0
CALLS = {
    "nothing": (lambda: {}, [[True, False, False]] * 2),
    "cache_position": (lambda: {"cache_position": torch.tensor([4, 5, 6])}, [[False] * 3] * 2),
    "cache_position_prompt": (lambda: {"cache_position": torch.arange(3)}, [[True, False, False]] * 2),
    "position_ids": (lambda: {"position_ids": torch.tensor([[4, 5, 6], [0, 1, 2]])},
                     [[False] * 3, [True, False, False]]),
    "cache": (lambda: {"cache": _cache_of(4)}, [[False] * 3] * 2),
    "past_key_values": (lambda: {"past_key_values": _cache_of(4)}, [[False] * 3] * 2),
    "legacy_tuple": (lambda: {"past_key_values": ((torch.zeros(2, 2, 4, 8),) * 2,)}, [[False] * 3] * 2),
    "empty_cache": (lambda: {"cache": _cache_of(0)}, [[True, False, False]] * 2),
    "mask_over_cache": (lambda: {"attention_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])},
                        [[True, False, False], [False, False, True]]),
}  # fmt: skip


@pytest.mark.parametrize("name", CALLS)
@torch.no_grad()
def test_position_zero_is_read_from_every_argument_naming(name):
    """transformers 5.24 renamed past_key_values to cache and stopped passing cache_position
    (generate passes position_ids instead); splicing then took each new token for position 0 and
    left it alone. Each naming, old and new, finds the same position 0 whatever release is installed."""
    kwargs, first = CALLS[name]
    model = _Stream()
    d = sae.create("topk", d_in=64, d_sae=128, k=4, hook_name="layer")
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with steer(model, d, latent=0, scale=5.0):
        steered = model(ids, **kwargs())
    untouched = (steered == model(ids)).all(-1)
    assert untouched.tolist() == first


@pytest.mark.parametrize(
    "use, error, message",
    [
        (lambda m, d: steer(m, d, latent="1", scale=1.0), TypeError, r"latents are integers 0\.\.127, got \['1'\]"),
        (lambda m, d: steer(m, d, latent=True, scale=1.0), TypeError, "got \\[True\\]"),
        (lambda m, d: ablate(m, d, ["1"]), TypeError, "latents are integers"),
        (lambda m, d: steer(m, d, latent=1, scale=float("nan")), ValueError, "scale must be finite, got nan"),
    ],
)  # fmt: skip
def test_steering_and_ablation_arguments_are_checked(use, error, message):
    d = sae.create("topk", d_in=64, d_sae=128, k=4, hook_name="layer")
    with pytest.raises(error, match=message), use(_Stream(), d):
        pass


def test_encode_names_a_numpy_input():
    import numpy as np

    d = sae.create("topk", d_in=64, d_sae=128, k=4)
    with pytest.raises(TypeError, match=r"torch tensors \[\.\.\., d_in=64\], got numpy\.ndarray"):
        d.encode(np.zeros((2, 64), dtype=np.float32))
