"""The toy-data generator against its configured statistics, the recovery scores against hand-built
SAEs whose answers are known, and a small TopK SAE trained on the toy data end to end."""

import json

import pytest
import torch
from torch.nn import functional as F

import sae
from eval.synthetic import (
    CrossCorrelation,
    SyntheticConfig,
    SyntheticData,
    fraction_recovered,
    mcc,
    mmcs_features,
    mmcs_latents,
    recovery,
)

# Nearly orthogonal features (d >> n_features) and magnitudes near 1, so that a hand-built SAE's
# latents fire exactly when their features do, up to rare interference.
HAND = SyntheticConfig(
    n_features=24, d=256, mean_active=2, magnitude_std=0.2, n_hierarchies=2, children_per_parent=2
)


def matched_sae(data: SyntheticData, k: int = 6) -> sae.SAE:
    """A TopK SAE whose latent i is feature i: W_dec = features, W_enc = features.T, zero biases."""
    d = sae.create("topk", d_in=data.cfg.d, d_sae=data.cfg.n_features, k=k)
    with torch.no_grad():
        d.W_dec.copy_(data.features)
        d.W_enc.copy_(data.features.T)
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


def firing_rate(data: SyntheticData, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fires [n, n_features] bool, empirical frequencies [n_features])."""
    fires = data.sample(n, torch.Generator().manual_seed(seed))[1] > 0
    return fires, fires.float().mean(0)


# -- the generator --------------------------------------------------------------------------------
def test_shapes_unit_features_and_the_power_law():
    data = SyntheticData(n_features=96, d=16, mean_active=4, exponent=1.0, n_hierarchies=3)
    x, codes = data.sample(100)
    assert x.shape == (100, 16) and codes.shape == (100, 96) and (codes >= 0).all()
    assert data.features.shape == (96, 16)
    assert torch.allclose(data.features.norm(dim=1), torch.ones(96))
    assert data.hierarchy == [(p, 90 + 2 * p + j) for p in range(3) for j in range(2)]
    assert abs(data.frequencies.sum().item() - 4) < 1e-4  # children included
    free = data.frequencies[:90]
    assert torch.allclose(free * torch.arange(1, 91), free[0].expand(90), rtol=1e-5)  # p_i ∝ 1/i
    assert [x.shape for x in data.batches(64, total=150)] == [(64, 16), (64, 16), (22, 16)]


def test_probabilities_clip_at_one_and_keep_mean_active():
    data = SyntheticData(n_features=10, d=4, mean_active=5, exponent=2.0)
    assert data.frequencies.max() == 1 and abs(data.frequencies.sum().item() - 5) < 1e-4
    fires, _ = firing_rate(data, 1000)
    assert fires[:, data.frequencies == 1].all()


@pytest.mark.parametrize("correlation", [0.0, 0.6])
def test_empirical_frequencies_match_the_marginals(correlation):
    data = SyntheticData(
        n_features=128, d=16, mean_active=6, n_hierarchies=4, correlation=correlation
    )
    n = 100_000
    _, rate = firing_rate(data, n)
    p = data.frequencies
    standard_error = (p * (1 - p) / n).sqrt()
    assert ((rate - p).abs() < 5 * standard_error + 1e-4).all()


def test_children_fire_only_with_their_parent_and_one_at_a_time():
    data = SyntheticData(
        n_features=40,
        d=8,
        mean_active=4,
        n_hierarchies=3,
        children_per_parent=3,
        child_probability=0.9,
    )
    fires, rate = firing_rate(data, 20_000)
    for parent, child in data.hierarchy:
        assert not (fires[:, child] & ~fires[:, parent]).any()
    children = fires[:, data.cfg.n_free :].view(-1, 3, 3)  # [n, parent, child]
    assert children.sum(-1).max() == 1
    parents = fires[:, :3]
    assert abs(children.any(-1)[parents].float().mean().item() - 0.9) < 0.02


def test_correlation_makes_features_fire_together():
    """The features whose hidden Gaussians correlate most fire together far more often than
    independent ones would; with correlation 0 the same features are independent."""
    cfg = SyntheticConfig(n_features=64, d=16, mean_active=8, exponent=0.0, correlation=0.6)
    correlated = SyntheticData(cfg)
    close = correlated.latent_correlation > 0.3
    close.fill_diagonal_(False)
    assert close.sum() >= 20
    for data, low, high in (
        (correlated, 0.1, 1.0),
        (SyntheticData(cfg, correlation=0.0), -0.01, 0.01),
    ):
        fires, _ = firing_rate(data, 50_000)
        assert torch.equal(data.features, correlated.features)
        firing_correlation = torch.corrcoef(fires.T.float())[close].mean().item()
        assert low < firing_correlation < high, (data.cfg.correlation, firing_correlation)


def test_noise_free_activations_are_codes_times_features():
    x, codes = SyntheticData(HAND).sample(500)
    assert torch.equal(x, codes @ SyntheticData(HAND).features)
    noisy = SyntheticData(HAND, noise=0.1)
    x, codes = noisy.sample(5000)
    assert abs((x - codes @ noisy.features).std().item() - 0.1) < 0.003


def test_the_seed_decides_everything():
    a, b, c = SyntheticData(HAND, seed=3), SyntheticData(HAND, seed=3), SyntheticData(HAND, seed=4)
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    for (xa, ca), (xb, cb) in zip(
        (a.sample(100), a.sample(100)), (b.sample(100), b.sample(100)), strict=True
    ):
        assert torch.equal(xa, xb) and torch.equal(ca, cb)
    assert torch.equal(next(a.batches(50)), next(b.batches(50)))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mean_active"):
        SyntheticConfig(n_features=4, mean_active=5)
    with pytest.raises(ValueError, match="n_features is 8"):
        SyntheticConfig(n_features=8, n_hierarchies=3, children_per_parent=2, mean_active=1)
    with pytest.raises(ValueError, match="correlation"):
        SyntheticConfig(correlation=1.5)


# -- the scores -----------------------------------------------------------------------------------
def test_score_helpers_against_hand_computation():
    cos = torch.tensor([[0.95, 0.5, 0.1], [0.2, 0.3, 0.85]])  # [features, latents]
    everyone, first_two = torch.tensor([True, True, True]), torch.tensor([True, True, False])
    assert mmcs_features(cos, everyone) == pytest.approx((0.95 + 0.85) / 2)
    assert mmcs_latents(cos, first_two) == pytest.approx((0.95 + 0.5) / 2)
    assert fraction_recovered(cos, everyone) == 0.5
    assert fraction_recovered(cos, everyone, threshold=0.8) == 1
    # latent 2 dead: feature 1 keeps only 0.3; a latent dying never raises a score
    assert mmcs_features(cos, first_two) == pytest.approx((0.95 + 0.3) / 2)
    assert fraction_recovered(cos, first_two, threshold=0.8) == 0.5
    assert mmcs_features(-cos, everyone) == pytest.approx((-0.1 - 0.2) / 2)
    assert mmcs_features(-cos, first_two) == pytest.approx((-0.5 - 0.2) / 2)
    assert mmcs_features(-cos, torch.tensor([False, False, False])) == 0
    # Greedy takes 0.9 and leaves 0.1; the best one-to-one matching is 0.8 + 0.85.
    assert mcc(torch.tensor([[0.9, 0.8], [0.85, 0.1]])) == pytest.approx(0.825)
    assert mcc(torch.tensor([[0.9], [0.5]])) == pytest.approx(0.45)  # an unmatched feature is 0

    torch.manual_seed(0)
    a, b = torch.randn(300, 3), torch.randn(300, 4)
    b[:, 2] = a[:, 0] * 2 + b[:, 2]
    b[:, 3] = 0  # a silent latent
    a[:, 1] = 1.5  # a feature that always fires at the same magnitude
    stats = CrossCorrelation()
    for a_part, b_part in zip(a.split(64), b.split(64), strict=True):
        stats.add(a_part, b_part)
    expected = torch.corrcoef(torch.cat([a, b], 1).T.double())[:3, 3:].nan_to_num(0.0)
    assert torch.allclose(stats.result(), expected, atol=1e-10)


def test_the_true_dictionary_scores_one_in_any_order():
    data = SyntheticData(HAND)
    scores = recovery(matched_sae(data), data, n=16_384)
    json.dumps(scores, allow_nan=False)
    assert scores["mmcs_features"] == pytest.approx(1) and scores["mmcs_latents"] == pytest.approx(
        1
    )
    assert scores["fraction_recovered"] == 1 and scores["mcc"] > 0.95
    assert scores["live_latents"] == 24 and scores["split_features"] == []

    permuted = matched_sae(data)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        permuted.W_dec.copy_(permuted.W_dec[order])
        permuted.W_enc.copy_(permuted.W_enc[:, order])
    again = recovery(permuted, data, n=16_384)
    for key in ("mmcs_features", "mmcs_latents", "fraction_recovered", "mcc", "absorption"):
        assert again[key] == pytest.approx(scores[key]), key


def test_a_feature_whose_latent_never_fires_is_not_recovered():
    """Latent 3 is feature 3's decoder row, but its encoder bias keeps it silent: the SAE
    cannot represent the feature, however well the direction sits in W_dec."""
    data = SyntheticData(HAND)
    silent = matched_sae(data)
    with torch.no_grad():
        silent.b_enc[3] = -1e3
    scores = recovery(silent, data, n=16_384)
    assert scores["live_latents"] == 23
    assert scores["fraction_recovered"] == pytest.approx(23 / 24)
    assert scores["mmcs_features"] == pytest.approx(23 / 24, abs=0.01)  # feature 3: ~0 cosine left


def test_a_random_dictionary_scores_low():
    data = SyntheticData(HAND)
    torch.manual_seed(0)
    scores = recovery(sae.create("topk", d_in=256, d_sae=24, k=6), data, n=16_384)
    assert scores["mmcs_features"] < 0.4 and scores["mmcs_latents"] < 0.4
    assert scores["fraction_recovered"] == 0 and scores["mcc"] < 0.5


def test_absorption_is_found_where_it_was_built_in():
    """The absorbing SAE's parent latent is inhibited by every child (encoder f_p - 2 f_c), and
    each child's latent decodes to the parent too, so it alone reconstructs parent + child."""
    data = SyntheticData(HAND)
    absorbing = matched_sae(data)
    with torch.no_grad():
        for parent, child in data.hierarchy:
            absorbing.W_enc[:, parent] -= 2 * data.features[child]
            absorbing.W_dec[child] = F.normalize(
                data.features[parent] + data.features[child], dim=0
            )
    clean = recovery(matched_sae(data), data, n=16_384)
    absorbed = recovery(absorbing, data, n=16_384)
    assert clean["absorption"] < 0.03 and absorbed["absorption"] > 0.95
    for before, after in zip(clean["absorption_pairs"], absorbed["absorption_pairs"], strict=True):
        assert before["parent_latent"] == after["parent_latent"] == after["parent"]
        assert before["child_latent"] == after["child_latent"] == after["child"]
        assert before["child_samples"] == after["child_samples"] > 500
        assert abs(before["child_latent_parent_cosine"]) < 0.2
        assert after["child_latent_parent_cosine"] > 0.6
    assert absorbed["split_features"] == []  # a half-and-half mix is not a split


def test_a_duplicated_latent_is_a_split():
    data = SyntheticData(HAND)
    matched = matched_sae(data)
    split = sae.create("topk", d_in=256, d_sae=25, k=6)
    with torch.no_grad():
        split.W_dec.copy_(torch.cat([matched.W_dec, matched.W_dec[5:6]]))
        split.W_enc.copy_(torch.cat([matched.W_enc, matched.W_enc[:, 5:6]], dim=1))
        split.b_enc.zero_()
        split.b_dec.zero_()
    scores = recovery(split, data, n=16_384)
    assert scores["split_features"] == [{"feature": 5, "latents": [5, 24]}]
    assert scores["mmcs_features"] == pytest.approx(1) and scores["live_latents"] == 25


# -- end to end -----------------------------------------------------------------------------------
def test_a_trained_topk_sae_recovers_the_features(tmp_path):
    """64 features in 32 dimensions (superposition), default power law and magnitudes; a TopK SAE
    with twice as many latents and k = mean_active, 200 steps of 512 rows. Seen on CPU: mmcs
    0.99, fraction recovered 0.97, MCC 0.89 (0.99 / 0.97-0.98 / 0.88-0.90 over three seeds)."""
    import train

    data = SyntheticData(n_features=64, d=32, mean_active=3)
    fit = dict(architecture="topk", d_sae=128, k=3, total_tokens=102_400, batch_size=512, lr=1e-2)
    trained = train.fit(data.batches(512), **fit, out=str(tmp_path), device="cpu")
    scores = recovery(trained, data, n=16_384)
    assert scores["mmcs_features"] > 0.95 and scores["fraction_recovered"] > 0.85, scores
    assert scores["mcc"] > 0.75, scores

    # The same scores from the command line, the toy data rebuilt from its config file.
    from sae.cli import main

    trained.save(tmp_path / "sae")
    (tmp_path / "synthetic.yaml").write_text("n_features: 64\nd: 32\nmean_active: 3\n")
    out = tmp_path / "report.json"
    main(
        [
            "eval",
            str(tmp_path / "sae"),
            "--synthetic",
            str(tmp_path / "synthetic.yaml"),
            "--json",
            str(out),
        ]
    )
    from_cli = json.loads(out.read_text())["synthetic"]
    expected = recovery(trained, data)  # the same fresh samples (seed 1); saving rounds at 1e-7
    for key, value in expected.items():
        assert from_cli[key] == (
            pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
        )

    torch.manual_seed(0)
    untrained = recovery(sae.create("topk", d_in=32, d_sae=128, k=3), data, n=4096)
    assert untrained["mmcs_features"] < 0.7 and untrained["fraction_recovered"] < 0.1
