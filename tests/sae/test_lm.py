"""Hookpoint names map to the right modules in every supported family, on real and tiny models."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from sae.hooks import record
from sae.lm import hook_names, load_lm, resolve_hook

TINY = {
    "gpt2": GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64),
    "gpt_neox": GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    ),
    "llama": LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    ),
}
DECODER = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=64, vocab_size=100)  # fmt: skip
MORE_TINY = {  # the other mapped families: hookpoints only
    "mistral": MistralConfig(**DECODER),
    "qwen2": Qwen2Config(**DECODER),
    "qwen3": Qwen3Config(**DECODER, head_dim=16),
    "phi3": Phi3Config(**DECODER, pad_token_id=0),
    "gemma": GemmaConfig(**DECODER, head_dim=16),
    "gemma2": Gemma2Config(**DECODER, head_dim=16),  # sublayer outputs normalized before the add
    "gemma3_text": Gemma3TextConfig(**DECODER, head_dim=16),
}


def tiny(family):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config({**TINY, **MORE_TINY}[family]).eval()


def all_hooks(layer):
    return [f"blocks.{layer}.hook_{k}" for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]


def check_residual_stream(model, ids, layer, parallel_or_prenorm=True):
    """resid_pre/resid_post equal the model's own hidden states, and in a pre-norm transformer
    the block adds exactly its attention and MLP outputs: resid_post = resid_pre + attn_out + mlp_out."""
    with torch.no_grad(), record(model, all_hooks(layer)) as acts:
        out = model(ids, output_hidden_states=True)
    pre, attn, mlp, post = (acts[h] for h in all_hooks(layer))
    torch.testing.assert_close(pre, out.hidden_states[layer])
    torch.testing.assert_close(post, out.hidden_states[layer + 1])
    if parallel_or_prenorm:
        torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [*TINY, *MORE_TINY])
def test_tiny_models_hookpoints(family):
    model = tiny(family)
    assert model.config.model_type == family
    ids = torch.randint(0, 100, (2, 9))
    check_residual_stream(model, ids, layer=1)


@pytest.mark.parametrize("family", list(TINY))
def test_local_hf_folder_loads(tmp_path, family, smollm2):
    model = tiny(family)
    model.save_pretrained(tmp_path)
    smollm2[1].save_pretrained(tmp_path)
    loaded, tok = load_lm(str(tmp_path))
    ids = torch.tensor([tok("Hello there").input_ids]) % 100
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert resolve_hook(loaded, "blocks.2.hook_mlp_out").layer == 2


def test_smollm2_hookpoints(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = torch.tensor(
        [[tok.bos_token_id] + tok("To be, or not to be, that is the question").input_ids]
    )
    check_residual_stream(model, ids, layer=6)
    assert resolve_hook(model, "blocks.6.hook_attn_out").module is model.model.layers[6].self_attn
    assert resolve_hook(model, "blocks.6.hook_mlp_out").module is model.model.layers[6].mlp


def test_smollm2_tokenizer_does_not_add_bos(smollm2):
    _, tok = smollm2
    assert tok.bos_token_id == 1
    assert tok("Hello").input_ids[0] != 1


def test_raw_module_path_matches_hook_name(smollm2):
    model, tok = smollm2
    ids = torch.tensor([[1] + tok("Good night, sweet prince").input_ids])
    with torch.no_grad(), record(model, ["model.layers.6", "blocks.6.hook_resid_post"]) as acts:
        model(ids)
    torch.testing.assert_close(acts["model.layers.6"], acts["blocks.6.hook_resid_post"])


def test_unknown_hookpoint_lists_valid_ones(smollm2):
    model, _ = smollm2
    with pytest.raises(
        ValueError,
        match=r"unknown hookpoint 'blocks.6.hook_resid_middle'.*Valid: blocks.L.\{hook_resid_pre,"
        r"hook_resid_post,hook_attn_out,hook_mlp_out,hook_resid_mid,mlp.hook_in,attn.hook_z,mlp.hook_post\} "
        r"for L in 0..29",
    ):
        resolve_hook(model, "blocks.6.hook_resid_middle")
    with pytest.raises(ValueError, match="layer 30 does not exist"):
        resolve_hook(model, "blocks.30.hook_resid_post")
    assert len(hook_names(model)) == 30 * 8


def test_minilm_bert_encoder_hookpoints():
    model, tok = load_lm("all-minilm-l6-v2")
    assert model.config.model_type == "bert"
    batch = tok(["the quick brown fox", "jumps"], return_tensors="pt", padding=True)
    check_residual_stream(model, batch.input_ids, layer=2, parallel_or_prenorm=False)
    with (
        torch.no_grad(),
        record(model, ["blocks.2.hook_attn_out", "blocks.2.hook_mlp_out"]) as acts,
    ):
        model(**batch)
    assert acts["blocks.2.hook_attn_out"].shape == (2, batch.input_ids.shape[1], 384)
    assert (
        resolve_hook(model, "blocks.2.hook_mlp_out").module is model.encoder.layer[2].output.dense
    )


def test_module_paths_resolve_from_the_base_model_too():
    """sparsify names a coder by its module in the base model (`h.1` in GPT-2, not
    `transformer.h.1`), which a splice into the LM-head model must still find."""
    model = tiny("gpt2")
    assert resolve_hook(model, "h.1").module is model.transformer.h[1]
    assert resolve_hook(model, "transformer.h.1").module is model.transformer.h[1]
    with pytest.raises(ValueError, match="unknown hookpoint 'layers.1'"):
        resolve_hook(model, "layers.1")


def test_a_module_path_that_is_never_called_is_refused():
    """A ModuleList has no forward: hooked, it would record nothing and splice nothing."""
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"'model.layers' is a ModuleList, which is never called"):
        resolve_hook(model, "model.layers")
    ids = torch.randint(0, 100, (1, 5))
    with record(model, ["model.layers.1", "blocks.1.hook_resid_post"]) as acts:
        with pytest.raises(KeyError, match="'model.layers.1' has not fired"):
            acts["model.layers.1"]
        model(ids)
    torch.testing.assert_close(acts["model.layers.1"], acts["blocks.1.hook_resid_post"])


BRIDGED = ["gpt2", "gpt_neox", "llama", "mistral", "phi3", "gemma2"]


@pytest.mark.parametrize("family", BRIDGED)
def test_every_hookpoint_equals_transformer_lens(tmp_path, family, smollm2):
    """Each TransformerLens name we map gives TransformerLens's own activation (its
    TransformerBridge around the same HF model), hook_z flattened over heads as SAELens does."""
    from transformer_lens.model_bridge import TransformerBridge

    model = tiny(family)
    with torch.no_grad():  # norm weights of 1 would hide whether mlp.hook_in is after the weight
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    smollm2[1].save_pretrained(tmp_path)  # the bridge loads a tokenizer beside the weights
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
    hooks = [h for h in hook_names(model) if h.startswith("blocks.1.")]
    assert len(hooks) == (7 if family == "gpt_neox" else 8)  # Pythia: parallel, no resid_mid
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad(), record(model, hooks) as acts:
        model(ids)
    _, cache = bridge.run_with_cache(ids)
    for hook in hooks:
        theirs = cache[hook].flatten(2)  # hook_z: [batch, seq, heads, d_head]
        torch.testing.assert_close(acts[hook], theirs, atol=1e-6, rtol=1e-5, msg=hook)
        assert resolve_hook(model, hook).width == theirs.shape[-1]


def test_bert_hookpoints_against_transformer_lens(tmp_path):
    """BERT (post-norm) is where TransformerLens's two conventions part. Its TransformerBridge and
    ours agree on resid_pre, resid_post (the block's output), mlp_out, hook_z and mlp.hook_post.
    attn_out is the attention's own contribution here, as in TransformerLens's HookedEncoder (W_O's
    output), while the bridge hooks the attention block after its residual add and LayerNorm; the
    bridge's resid_mid is LN2's input, HookedEncoder's LN1's, so we map none (decision 8)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(tmp_path)
    load_lm("all-minilm-l6-v2")[1].save_pretrained(tmp_path)  # the bridge wants a tokenizer
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
    hooks = [h for h in hook_names(model) if h.startswith("blocks.1.")]
    assert "blocks.1.hook_resid_mid" not in hooks
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad(), record(model, hooks) as acts:
        model(ids)
    _, cache = bridge.run_with_cache(ids)
    theirs = {"blocks.1.mlp.hook_in": "blocks.1.hook_mlp_in"}  # the bridge's BERT name for it
    for hook in set(hooks) - {"blocks.1.hook_attn_out"}:
        torch.testing.assert_close(acts[hook], cache[theirs.get(hook, hook)].flatten(2), msg=hook)
    layer = model.bert.encoder.layer[1].attention.output
    with torch.no_grad():
        added = layer.LayerNorm(acts["blocks.1.hook_resid_pre"] + acts["blocks.1.hook_attn_out"])
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], added)
