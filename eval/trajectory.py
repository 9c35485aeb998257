"""A model's training trajectory made here: a small Llama trained from scratch on the embedded
Shakespeare plays, its checkpoints saved as revisions of a local repo laid out as the Hugging Face
hub's cache (`refs/step<N>` naming a snapshot), so that `--revision step<N>` loads them through
huggingface_hub exactly as it loads Pythia's `step8000`. The hub is out of reach here; this is
what `sae track` is tested and shown on (docs/tracking.md).

    sae trajectory --checkpoints 0 200 1000 2000
    sae harvest --model local/shakespeare-llama --revision step1000 ...   # HF_HUB_OFFLINE=1

Each checkpoint's loss on held-out plays (the test split) is written to trajectory.json beside the
repo's refs, and returned.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sae.io import write_json
from sae.lm import smollm2_dir
from train.data import load_documents, token_windows


@dataclass
class TrajectoryConfig:
    """Train a small Llama from scratch on the embedded Shakespeare and save checkpoints as hub
    revisions of a local repo."""

    repo: str = "local/shakespeare-llama"
    """The repo id the checkpoints are revisions of."""
    cache: str = ""
    """The Hugging Face hub cache to write into (empty: huggingface_hub's, HF_HUB_CACHE)."""
    checkpoints: list[int] = field(default_factory=lambda: [0, 200, 1000, 2000])
    """Steps at which to save a revision `step<N>` (0: the initialisation); main is the last."""
    d_model: int = 128
    """Residual stream width."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    context_size: int = 128
    """Tokens per training window."""
    batch_size: int = 16
    """Windows per step."""
    lr: float = 3e-3
    """AdamW's learning rate, after 20 steps of linear warm-up."""
    seed: int = 0
    """Seed of the initialisation."""

    def __post_init__(self) -> None:
        if not self.checkpoints or min(self.checkpoints) < 0:
            raise ValueError(f"checkpoints are steps >= 0, got {self.checkpoints}")


def hub_repo(cfg: TrajectoryConfig) -> Path:
    from huggingface_hub import constants

    root = Path(cfg.cache or constants.HF_HUB_CACHE)
    return root / f"models--{cfg.repo.replace('/', '--')}"


def save_revision(model, tokenizer, repo: Path, revision: str) -> None:
    """The model and tokenizer as huggingface_hub caches a snapshot, `revision` naming it."""
    commit = hashlib.sha1(f"{repo.name}@{revision}".encode()).hexdigest()
    model.save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


class CorpusSoftmax:
    """The model's next-token loss over its whole vocabulary, computed over the tokens the corpus
    uses. The checkpoints keep SmolLM2's tokenizer (49,152 tokens, so every tool loads them as it
    loads SmolLM2), but the plays use 18,721 of them, and on CPU the 49,152-way softmax is most of
    a training step. The other tokens' embedding rows are set to zero and stay so (they are never
    an input and get no gradient), so their logits are exactly 0 and the softmax's normaliser is
    the corpus tokens' plus (the others' count) x e^0: the same loss as `model(labels=...)`,
    about twice as fast."""

    def __init__(self, corpus: Tensor, vocab_size: int) -> None:
        self.used = corpus.unique()
        self.index = torch.full((vocab_size,), -1, dtype=torch.long)
        self.index[self.used] = torch.arange(len(self.used))
        self.log_others = (
            math.log(vocab_size - len(self.used)) if len(self.used) < vocab_size else -math.inf
        )

    @torch.no_grad()
    def zero_others(self, model: nn.Module) -> None:
        weight = model.get_input_embeddings().weight
        keep = torch.zeros(len(weight), dtype=torch.bool)
        keep[self.used] = True
        weight[~keep] = 0

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        hidden = model.model(batch).last_hidden_state[:, :-1]
        logits = hidden @ model.get_output_embeddings().weight[self.used].T
        others = logits.new_full((*logits.shape[:-1], 1), self.log_others)
        targets = self.index[batch[:, 1:]]
        return F.cross_entropy(torch.cat([logits, others], -1).flatten(0, 1), targets.flatten())


@torch.no_grad()
def heldout_loss(model, batch: torch.Tensor) -> float:
    model.eval()
    loss = model(batch, labels=batch).loss.item()
    model.train()
    return loss


def make_trajectory(cfg: TrajectoryConfig) -> dict[str, float]:
    """Train, saving each checkpoint; returns each revision's held-out loss (nats per token)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=cfg.context_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    ))  # fmt: skip

    def windows(split: str):
        return (torch.from_numpy(w.tokens) for w in token_windows(
            tokenizer, enumerate(load_documents("shakespeare", split)), cfg.context_size))  # fmt: skip

    train, test = torch.stack(list(windows("train"))), torch.stack(list(windows("test")))
    softmax = CorpusSoftmax(torch.cat([train, test]), len(tokenizer))
    softmax.zero_others(model)
    heldout = test[:16]
    order = torch.randperm(len(train))  # the plays' windows drawn at random, as LMs are trained
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1, (step + 1) / 20))
    repo, losses = hub_repo(cfg), {}
    for step in range(max(cfg.checkpoints) + 1):
        if step in cfg.checkpoints:
            save_revision(model, tokenizer, repo, f"step{step}")
            losses[f"step{step}"] = heldout_loss(model, heldout)
            print(f"step {step}: held-out loss {losses[f'step{step}']:.3f}", flush=True)
        if step == max(cfg.checkpoints):
            break
        batch = train[order[(step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(train)]]
        softmax.loss(model, batch).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    save_revision(model, tokenizer, repo, "main")
    write_json(repo / "trajectory.json", {"repo": cfg.repo, "heldout_loss": losses})
    return losses


def trajectory_cli(cfg: TrajectoryConfig) -> None:
    losses = list(make_trajectory(cfg).values())
    print(
        f"revisions step{', step'.join(map(str, sorted(cfg.checkpoints)))} and main of "
        f"{cfg.repo} in {hub_repo(cfg)}; held-out loss {losses[0]:.2f} -> {losses[-1]:.2f} nats"
    )
