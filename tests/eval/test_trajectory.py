"""The trajectory made here (eval/trajectory.py): a small Llama trained from scratch on the
embedded plays learns (its held-out loss falls by nats), and its checkpoints load as hub
revisions through huggingface_hub's cache, as Pythia's do."""

import huggingface_hub.constants
import torch

from eval.trajectory import TrajectoryConfig, make_trajectory
from sae.lm import load_lm


def test_a_small_llama_learns_and_its_checkpoints_load_as_revisions(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = TrajectoryConfig(checkpoints=[0, 40], d_model=32, layers=2, heads=2, context_size=32, lr=1e-2,
                           batch_size=4)  # fmt: skip
    losses = make_trajectory(cfg)
    assert list(losses) == ["step0", "step40"]
    # from ln(49152) = 10.8 nats at the start, 2.9 lower after 40 steps (measured)
    assert losses["step0"] - losses["step40"] > 2.5, losses
    first, _ = load_lm(cfg.repo, revision="step0")
    last, _ = load_lm(cfg.repo, revision="step40")
    main, _ = load_lm(cfg.repo)
    weights = [m.model.embed_tokens.weight for m in (first, last, main)]
    assert not torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])
