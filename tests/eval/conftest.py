"""A small TopK SAE on SmolLM2's layer 6, trained once for every eval test, and held-out windows."""

from itertools import islice

import pytest
import torch

import train
from train.data import load_documents, token_windows
from train.harvest import harvest

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="session")
def heldout_ids(smollm2):
    windows = islice(
        token_windows(smollm2[1], enumerate(load_documents("shakespeare", "test")), 64), 8
    )
    return torch.stack([torch.from_numpy(w.tokens) for w in windows])


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """16k tokens of layer 6 from the training plays, windows of 64."""
    return harvest(
        out=str(tmp_path_factory.mktemp("eval") / "cache"),
        hook=[HOOK],
        tokens=16_384,
        context_size=64,
        shard_windows=64,
        dtype="float32",
        device="cpu",
    )


@pytest.fixture(scope="session")
def trained_sae(small_cache, tmp_path_factory):
    """The SAE the evaluation tests were written against: its rate, warm-up and start are pinned,
    so that a change of the training defaults does not move the latents they count."""
    return train.fit(
        small_cache.url,
        architecture="topk",
        k=32,
        expansion_factor=4,
        total_tokens=16_384,
        batch_size=2048,
        lr=4e-3,
        warmup_steps=1,
        encoder_init="tied",
        out=str(tmp_path_factory.mktemp("eval") / "run"),
    )
