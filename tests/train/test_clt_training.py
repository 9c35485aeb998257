"""Training cross-layer transcoders: on synthetic layers where each MLP output depends on the
latents of every earlier layer (which a CLT can express and per-layer transcoders cannot), in one
sweep with those transcoders and an SAE; Ctrl-C and resume; what a CLT run refuses."""

import json
import os
import signal
import warnings

import pytest
import torch
from torch.nn.functional import normalize

import sae
import train
from sae.clt import CLTConfig, CrossLayerTranscoder
from sae.models import TARGET_L0_COEFFICIENT
from tests.conftest import write_cache
from train.config import TrainConfig
from train.trainer import Trainer

LAYERS, D, FEATURES = 3, 16, 24
IN, OUT = "mlp.hook_in", "hook_mlp_out"


def layered(rows=30_000, p=0.06, seed=0):
    """x_i = c_i @ E_i and y_j = sum_{i <= j} c_i @ D_ij for sparse codes c_i of each layer."""
    g = torch.Generator().manual_seed(seed)
    E = normalize(torch.randn(LAYERS, FEATURES, D, generator=g), dim=-1)
    Dec = normalize(torch.randn(LAYERS, LAYERS, FEATURES, D, generator=g), dim=-1)
    c = (torch.rand(LAYERS, rows, FEATURES, generator=g) < p) * (
        0.5 + torch.rand(LAYERS, rows, FEATURES, generator=g)
    )
    xs = [c[i] @ E[i] for i in range(LAYERS)]
    ys = [sum(c[i] @ Dec[i, j] for i in range(j + 1)) for j in range(LAYERS)]
    return torch.cat(xs, -1), torch.cat(ys, -1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    x, y = layered()
    shards = []
    for a, b in zip(x.split(3000), y.split(3000), strict=True):
        shard = {f"blocks.{i}.{IN}": a[:, i * D : (i + 1) * D] for i in range(LAYERS)}
        shard |= {f"blocks.{i}.{OUT}": b[:, i * D : (i + 1) * D] for i in range(LAYERS)}
        shards.append(shard)
    return write_cache(tmp_path_factory.mktemp("clt") / "cache", shards), x, y


def explained_variance(y_hat, y):
    return float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


RUN = dict(d_sae=48, k=4, total_tokens=300_000, batch_size=1000, warmup_steps=10, lr=1e-2)


def test_a_clt_trains_beside_transcoders_and_an_sae_and_predicts_what_they_cannot(cache, tmp_path):
    cache, x, y = cache
    sweep = [{"layers": "0-2", "hook": IN, "hook_out": OUT}]
    sweep += [{"hook": f"blocks.{i}.{IN}", "hook_out": f"blocks.{i}.{OUT}"} for i in range(LAYERS)]
    sweep += [{"hook": f"blocks.0.{IN}"}]  # an SAE, in the same pass
    clt, *transcoders, sae_0 = train.fit(
        cache.url, architecture="topk", sweep=sweep, out=str(tmp_path / "run"), **RUN
    )
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.layers == [0, 1, 2]
    assert not sae_0.cfg.is_transcoder
    with torch.no_grad():
        clt_ev = explained_variance(clt(x), y)
        per_layer = torch.cat([t(x[:, i * D : (i + 1) * D]) for i, t in enumerate(transcoders)], -1)
        set_ev = explained_variance(per_layer, y)
    # 0.92 and 0.46 here: outputs 1 and 2 hold earlier layers' codes, which their own inputs lack
    assert clt_ev > 0.85 and clt_ev > set_ev + 0.2, (clt_ev, set_ev)
    saved = sae.load(tmp_path / "run" / "clt-L0-2-topk-k4-x48-mlp_hook_in-to-hook_mlp_out")
    torch.testing.assert_close(saved(x[:50]), clt(x[:50]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def jumprelu_clts(cache, tmp_path_factory):
    """JumpReLU CLTs from random decoder rows under the L0 penalty, aimed at L0 k (their default),
    and under the L0 penalty with the pre-activation loss (weight 0.03), in one run: L0 per layer,
    explained variance and the fraction of latents silent on 3000 rows."""
    cache, x, y = cache
    sweep = [{"target_l0": False, "name": "l0"}, {"name": "target"},
             {"target_l0": False, "pre_act_coefficient": 0.03, "name": "pre_act"}]  # fmt: skip
    with warnings.catch_warnings():  # the L0 penalty's CLT is told it ended far from k
        warnings.simplefilter("ignore", UserWarning)
        clts = train.fit(cache.url, architecture="jumprelu", layers="0-2", hook=IN, hook_out=OUT,
                         d_sae=48, k=4, sweep=sweep, total_tokens=300_000, batch_size=1000,
                         out=str(tmp_path_factory.mktemp("jumprelu")))  # fmt: skip
    scores = {}
    for spec, clt in zip(sweep, clts, strict=True):
        with torch.no_grad():
            z = clt.encode(x[:3000])
            scores[spec["name"]] = ((z > 0).sum(-1).float().mean().item() / LAYERS,
                                    explained_variance(clt(x[:3000]), y[:3000]),
                                    1 - (z > 0).any(0).float().mean().item())  # fmt: skip
    return scores


def test_a_jumprelu_clt_aiming_at_l0_k_keeps_its_code_where_the_l0_penalty_lets_it_thin(
    jumprelu_clts,
):
    """A CLT's random decoder rows first predict noise (explained variance -1.9 at step 1), and
    the quickest cut in that error is a thinner code: L0 falls from the fitted start's k per layer
    in the first steps (to 1.4 of 4 here), and an L0 penalty, which only ever thins it, never
    brings it back. Aimed at k (target_l0, a JumpReLU CLT's default: sae.clt.AIMED_AT_K), each
    layer's penalty pulls its L0 back up: 3.8 per layer against 1.4, explaining 0.87 of the outputs
    against 0.78."""
    scores = jumprelu_clts
    assert scores["l0"][0] < 4 / 2 and 4 / 1.2 < scores["target"][0] < 4 * 1.2, scores
    assert scores["target"][1] > scores["l0"][1] + 0.05, scores


def test_the_pre_activation_loss_brings_back_the_latents_a_jumprelu_clt_lost(jumprelu_clts):
    """Under the L0 penalty 8% of the latents end silent (on 3000 rows); with the pre-activation
    loss none do, L0 rises from 1.4 to 2.7 per layer and the CLT explains 0.86 against 0.78
    (weights 0.01 / 0.1 / 0.3: 1% silent, 0.83 / none, 0.86 / none, 0.82 at L0 8)."""
    scores = jumprelu_clts
    assert scores["l0"][2] > 0.05 and scores["pre_act"][2] == 0, scores
    assert scores["pre_act"][1] > scores["l0"][1] + 0.05, scores


def test_a_clt_interrupted_by_ctrl_c_resumes_to_the_uninterrupted_run(cache, tmp_path, monkeypatch):
    cache, _, _ = cache
    settings = dict(architecture="jumprelu", layers="0-2", hook=IN, hook_out=OUT, d_sae=32,
                    total_tokens=20_000, batch_size=1000, warmup_steps=2)  # fmt: skip
    clean = train.fit(cache.url, out=str(tmp_path / "clean"), **settings)
    step = Trainer.train_step

    def interrupted_at_12(self, batch):
        if self.step == 12:
            os.kill(os.getpid(), signal.SIGINT)  # lands during the step: kept, then stopped
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_12)
    with pytest.raises(KeyboardInterrupt):
        train.fit(cache.url, out=str(tmp_path / "cut"), **settings)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 13, "the step Ctrl-C landed in is kept"
    monkeypatch.setattr(Trainer, "train_step", step)
    refused = r"jumprelu-x32-mlp_hook_in-to-hook_mlp_out\.target_l0: True -> False"  # its default
    with pytest.raises(ValueError, match=refused):
        train.fit(cache.url, out=str(tmp_path / "cut"), resume=True, target_l0=False, **settings)
    resumed = train.fit(cache.url, out=str(tmp_path / "cut"), resume=True, **settings)
    for key, value in clean.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"hook": f"blocks.0.{IN}", "hook_out": OUT}, "name a hookpoint kind such as mlp.hook_in"),
        ({"hook": ""}, "needs --hook: the hookpoint kind"),
        ({"hook": IN, "hook_out": OUT, "layers": "0-3"}, r"wants hookpoint 'blocks\.3\.hook_mlp_out'"),
        ({"hook": IN, "hook_out": OUT, "layers": "2-1"}, "expected ranges such as 0-29"),
        ({"hook": IN, "hook_out": OUT, "skip": True}, "drop --skip"),
        ({"hook": IN, "hook_out": OUT, "architecture": "matryoshka_batchtopk"}, "layers use one of"),
    ],
)  # fmt: skip
def test_a_clt_run_refuses_what_it_cannot_train(cache, tmp_path, settings, message):
    cache, _, _ = cache
    settings = {"layers": "0-2", "d_sae": 32, "total_tokens": 2000, "batch_size": 1000, **settings}
    with pytest.raises(ValueError, match=message):
        train.fit(cache.url, out=str(tmp_path / "run"), **settings)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("architecture", ["jumprelu", "topk"])
def test_a_clt_on_two_processes_equals_one_process(cache, tmp_path, architecture):
    """torchrun with 2 gloo processes: each rank's half of every batch, gradients averaged, the
    same CLT as one process (per-row rules; a batch-wide one selects within each rank's rows)."""
    from tests.train.test_trainer import one_and_two_processes

    cache, _, _ = cache
    common = ["--cache", cache.url, "--layers", "0-2", "--hook", IN, "--hook-out", OUT,
              "--architecture", architecture, "--k", "4", "--d-sae", "32", "--batch-size", "500",
              "--total-tokens", "10000", "--device", "cpu", "--dead-tokens", "1000"]  # fmt: skip
    one_and_two_processes(tmp_path, *common)
    (folder,) = (tmp_path / "one").glob("clt-*")
    a, b = sae.load(folder), sae.load(tmp_path / "two" / folder.name)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["jumprelu", "standard"])
def test_a_clt_s_fitted_start_has_each_layer_s_latents_fire_on_k_of_d_sae_rows(architecture):
    """From threshold 0.01 (JumpReLU) or bias 0 (ReLU-L1) over a third of each layer's latents fire
    on a row; the fitted start places each layer's thresholds or biases on its own input so each
    latent fires on k / d_sae of the batch, and scales nothing: a CLT's random decoder rows are
    unrelated to its encoders."""
    x, y = layered(rows=3000)
    hooks = [f"blocks.{i}.{kind}" for kind in (IN, OUT) for i in range(LAYERS)]
    clt = CrossLayerTranscoder(CLTConfig(architecture=architecture, d_in=D, d_sae=48, k=4,
                                         hook_names=hooks[:LAYERS], hook_names_out=hooks[LAYERS:]))  # fmt: skip
    clt.start_training()
    assert (clt.encode(x) > 0).sum(-1).float().mean() > 40  # of 3 x 48
    W_enc = [part.W_enc.clone() for part in clt.parts]
    assert clt.fit_code_scale(x, y) == 1.0
    fires = (clt.encode(x) > 0).sum(0)
    assert (fires == round(3000 * 4 / 48)).all()  # every latent of every layer: L0 4 per layer
    assert all(torch.equal(p.W_enc, w) for p, w in zip(clt.parts, W_enc, strict=True))


@pytest.mark.filterwarnings("ignore::UserWarning")  # a short run
def test_a_clt_trains_from_the_fitted_start_at_l0_k_by_default(cache, tmp_path):
    """Through the trainer: the first step's L0 (logged before the update) is k per layer from
    the default start (auto: fitted, for a CLT), where the tied start's first code is several
    times denser."""
    cache, _, _ = cache
    sweep = [{"encoder_init": start, "name": start} for start in ("tied", "auto")]
    train.fit(cache.url, architecture="jumprelu", layers="0-2", hook=IN, hook_out=OUT, d_sae=48,
              k=4, sweep=sweep, total_tokens=2000, batch_size=1000, out=str(tmp_path / "run"))  # fmt: skip
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["metrics/l0/auto"] == pytest.approx(4 * LAYERS, rel=0.1)
    assert step["metrics/l0/tied"] > 3 * step["metrics/l0/auto"]


@pytest.mark.parametrize(
    "settings, aimed, zero",
    [
        ({"architecture": "jumprelu"}, True, False),  # its default: sae.clt.AIMED_AT_K
        ({"architecture": "jumprelu", "target_l0": False}, False, False),
        ({"architecture": "jumprelu", "decoder_init": "zero"}, True, True),
        ({"architecture": "batchtopk"}, False, False),  # L0 set by k
    ],
)
def test_a_clt_s_penalty_and_decoder_start_are_its_rule_s_unless_set(
    cache, tmp_path, settings, aimed, zero
):
    cache, _, _ = cache
    cfg = TrainConfig(out=str(tmp_path / "run"), layers="0-2", hook=IN, hook_out=OUT, d_sae=48,
                      k=4, batch_size=1000, total_tokens=2000, **settings)  # fmt: skip
    trainer = Trainer(cfg, cache)
    (m,) = trainer.members
    assert trainer.target_l0(m) is aimed
    assert trainer.coefficient(m) == (
        TARGET_L0_COEFFICIENT if aimed else m.sae.default_coefficient(2, 48)
    )
    assert all(part.W_dec.any() for part in m.sae.parts) is not zero


@pytest.mark.filterwarnings("ignore::UserWarning")  # a short run
@pytest.mark.parametrize("b_dec_init", ["mean", "zeros"])
def test_a_clt_s_first_batch_centres_each_layer_s_input(cache, tmp_path, b_dec_init):
    """b_dec_init's statistic of the first batch's inputs is what each layer's encoder subtracts
    (its inputs then average zero over that batch), so Adam's first steps on W_enc do not move
    every pre-activation together; zeros leaves them uncentred."""
    cache, _, _ = cache
    cfg = TrainConfig(out=str(tmp_path / "run"), architecture="jumprelu", layers="0-2", hook=IN,
                      hook_out=OUT, d_sae=48, k=4, batch_size=1000, total_tokens=2000,
                      b_dec_init=b_dec_init)  # fmt: skip
    trainer = Trainer(cfg, cache)
    batch = next(iter(trainer.source))
    trainer.start_members(batch)
    (m,) = trainer.members
    x = m.input(batch).float()
    centres = torch.stack([part.input_centre for part in m.sae.layers])
    means = torch.stack(m.sae.scaled_inputs(x)).mean(1) - centres  # [layers, d]
    assert means.shape == (LAYERS, D)
    if b_dec_init == "zeros":
        assert not centres.any() and means.abs().max() > 0.05
    else:
        assert means.abs().max() < 1e-5 and centres.abs().max() > 0.05
