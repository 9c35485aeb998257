"""Streaming top activations and activation samples against brute force over all tokens."""

import pytest
import torch

from eval.top_activations import TopActivations, activations_at, gather, token_context


def sparse_codes(n: int, d_sae: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d_sae, generator=g) * (torch.rand(n, d_sae, generator=g) < density)


def stream(z: torch.Tensor, batch: int, **kw) -> TopActivations:
    top = TopActivations(z.shape[1], **kw)
    for start in range(0, len(z), batch):
        top.add(z[start : start + batch], start)
    return top


def test_top_activations_equal_a_sort_of_all_tokens_whatever_the_batching():
    z = sparse_codes(1000, 12, 0.05)
    z[:, 3] = 0  # a dead latent
    z[7, 4] = 5.0  # a lone firing
    for batch in (1000, 64, 7):
        top = stream(z, batch, top=10, sample=30)
        assert torch.equal(top.fires, (z > 0).sum(0))
        for latent in range(12):
            values, tokens = top.top_examples(latent)
            expected = z[:, latent].sort(descending=True)
            n = min(10, int((z[:, latent] > 0).sum()))
            torch.testing.assert_close(values, expected.values[:n])
            torch.testing.assert_close(z[tokens, latent], values)
        assert len(top.top_examples(3)[0]) == 0


def test_the_top_list_keeps_each_window_once_at_its_strongest_token():
    """Window 0 holds the three strongest tokens: it is shown once, at its best, and the next
    windows fill the list (a page showed the same context three times)."""
    z = torch.zeros(40, 1)  # 4 windows of 10 tokens
    z[[2, 5, 7], 0] = torch.tensor([4.0, 5.0, 3.0])
    z[[13, 24, 38, 39], 0] = torch.tensor([2.0, 1.0, 0.5, 1.5])
    for batch in (40, 10, 7, 3):  # windows whole in a batch, or split between batches
        values, tokens = stream(z, batch, top=3, window=10).top_examples(0)
        assert values.tolist() == [5.0, 2.0, 1.5] and tokens.tolist() == [5, 13, 39]
    _, tokens = stream(z, 7, top=3).top_examples(0)  # without windows, token by token
    assert tokens.tolist() == [5, 2, 7]


def test_windowed_top_activations_equal_a_sort_of_window_peaks_whatever_the_batching():
    z = sparse_codes(1000, 12, 0.05)
    peaks, positions = z.view(100, 10, 12).max(1)  # windows of 10 tokens
    for batch in (1000, 64, 7, 10):
        top = stream(z, batch, top=8, sample=30, window=10)
        assert torch.equal(top.fires, (z > 0).sum(0))
        for latent in range(12):
            values, tokens = top.top_examples(latent)
            expected = peaks[:, latent].sort(descending=True)
            n = min(8, int((peaks[:, latent] > 0).sum()))
            windows = expected.indices[:n]
            torch.testing.assert_close(values, expected.values[:n])
            assert torch.equal(tokens, windows * 10 + positions[windows, latent])


def test_gather_keeps_the_strongest_windows_once(smollm2, trained_sae, heldout_ids):
    """On SmolLM2, as the dashboard and auto-interp gather, against each window's peak read from
    activations_at."""
    lm, per_window = smollm2[0], heldout_ids.shape[1] - 1
    examples = gather(lm, trained_sae, heldout_ids, top=5)
    busy = examples.fires.argsort(descending=True)[:20].tolist()
    every_window = [w * per_window for w in range(len(heldout_ids))]
    acts = activations_at(lm, trained_sae, heldout_ids, every_window, busy)
    for latent in busy:
        peaks = sorted(((max(a), w) for w, a in acts[latent].items() if max(a) > 0), reverse=True)
        values, tokens = examples.top_examples(latent)
        assert (tokens // per_window).tolist() == [w for _, w in peaks[:5]]
        assert values.tolist() == pytest.approx([p for p, _ in peaks[:5]], rel=1e-5)
        assert len(values) == 5  # busy latents fire in more than 5 of the 8 windows


def test_samples_are_active_distinct_and_uniform():
    z = torch.zeros(200, 1)
    active = torch.arange(0, 200, 4)  # 50 firing tokens
    z[active, 0] = torch.linspace(0.1, 5, 50)
    counts = torch.zeros(200)
    for seed in range(1000):
        top = stream(z, 33, top=5, sample=10, seed=seed)
        values, tokens = top.sample.entries(0)
        assert len(tokens) == 10 and len(set(tokens.tolist())) == 10
        torch.testing.assert_close(z[tokens, 0], values)
        counts[tokens] += 1
    # each firing token is kept with probability 10/50: 200 of 1000 runs, sd ~13
    assert counts[active].sub(200).abs().max() < 60 and counts.sum() == counts[active].sum()


def test_quantile_examples_run_from_low_to_high():
    z = sparse_codes(5000, 3, 0.3, seed=1)
    top = stream(z, 512, top=5, sample=100)
    bins = top.quantile_examples(0, bins=4, per_bin=3)
    assert [len(v) for v, _ in bins] == [3, 3, 3, 3]
    maxima = [v.max().item() for v, _ in bins]
    assert maxima == sorted(maxima) and bins[0][0].min() < 0.1 < 0.9 < bins[-1][0].max()
    for values, tokens in bins:
        torch.testing.assert_close(z[tokens, 0], values)


def test_context_is_read_around_the_scored_token():
    ids = torch.arange(40).view(4, 10)  # 4 windows, 9 scored tokens each (position 0 is BOS)
    assert token_context(ids, 0, before=3, after=2) == ([1, 2, 3], 0)
    assert token_context(ids, 9 + 4, before=3, after=2) == ([12, 13, 14, 15, 16, 17], 3)
    assert token_context(ids, 35, before=2, after=5) == ([37, 38, 39], 2)
