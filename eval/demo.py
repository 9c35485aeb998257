"""`sae demo`: the embedded default end to end on CPU. Harvest SmolLM2's layer-6 residual stream on
Shakespeare (training plays and held-out plays apart), train a TopK SAE and a second config on the
same batches (logged to an offline W&B run) with the library's default settings, score both on the
held-out plays (reconstruction, and the LM's loss with each spliced in), print a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eval.reconstruction import ReconstructionStats
from eval.report import evaluate
from eval.sparsity import SparsityStats
from sae.io import write_json
from sae.models import SAE
from train.cache import ActivationCache
from train.config import TrainConfig
from train.harvest import harvest
from train.trainer import Trainer


@dataclass
class DemoConfig:
    """Harvest, train two SAEs in one pass, and evaluate them on held-out plays, under runs/demo/."""

    out: str = "runs/demo"
    """Where everything goes: cache/, heldout/, sae/ (the TopK SAE), metrics, W&B offline run."""
    hook: str = "blocks.6.hook_resid_post"
    """Hookpoint of SmolLM2-135M to factor."""
    train_tokens: int = 600_000
    """Activations harvested from the training plays and trained on."""
    eval_tokens: int = 40_000
    """Activations harvested from the 4 held-out plays for evaluation."""
    k: int = 32
    """Active latents per token."""
    batch_size: int = 4096
    """Rows per optimizer step."""
    ce_tokens: int = 8192
    """Held-out tokens on which each SAE is spliced into the LM for CE loss recovered and the KL
    score (four LM passes over them per SAE)."""
    wandb_project: str = "sae-forge-demo"
    """W&B project (offline unless a key is set); empty to skip W&B."""


SPLICED = ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_loss_recovered", "kl_score")
"""The spliced-in scores the summary gives beside the reconstruction (eval/splice.py)."""


@torch.no_grad()
def heldout_scores(sae: SAE, cache: ActivationCache) -> dict[str, float]:
    """Reconstruction of the SAE's input (a transcoder's prediction of its output), mean L0 and
    dead share on the held-out activations (no LM needed)."""
    hook, hook_out = sae.cfg.hook_name, sae.cfg.hook_name_out
    recon, sparsity = ReconstructionStats(), SparsityStats(sae.cfg.d_sae)
    for batch in cache.batches(4096, hook=sorted({hook, hook_out}), shuffle=False):
        x = batch[hook].float()
        z = sae.encode(x)
        recon.add(batch[hook_out].float(), sae.predict(x, z))
        sparsity.add(z)
    spars = sparsity.result()
    return {**recon.result(), "l0": spars["l0"], "dead_fraction": spars["dead_fraction"]}


def train_and_heldout(
    out: Path, hooks: list[str], train_tokens: int, eval_tokens: int
) -> tuple[ActivationCache, ActivationCache]:
    """SmolLM2's activations at `hooks` on the 34 training plays (out/cache) and on the 4 held-out
    plays (out/heldout); a cache already there is kept (a harvest resumes or returns it)."""
    common = {"hook": hooks, "device": "cpu"}
    cache = harvest(out=str(out / "cache"), tokens=train_tokens, split="train", **common)
    heldout = harvest(out=str(out / "heldout"), tokens=eval_tokens, split="test", **common)
    return cache, heldout


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    cache, heldout = train_and_heldout(out, [cfg.hook], cfg.train_tokens, cfg.eval_tokens)
    sweep = [
        {"architecture": "topk", "k": cfg.k, "expansion_factor": 8, "name": "sae"},
        {
            "architecture": "batchtopk",
            "k": cfg.k,
            "expansion_factor": 4,
            "name": f"batchtopk-k{cfg.k}-x4",
        },
    ]
    train_cfg = TrainConfig(
        cache=cache.url, out=str(out), total_tokens=cfg.train_tokens, batch_size=cfg.batch_size,
        sweep=sweep, wandb_project=cfg.wandb_project, device="cpu",
        overwrite=True,  # running the demo again trains it again
    )  # fmt: skip
    saes = Trainer(train_cfg, cache).run()
    summary = {}
    for spec, sae in zip(sweep, saes, strict=True):
        spliced = evaluate(sae, cache=heldout.url, tokens=cfg.ce_tokens, concepts=False,
                           absorption=False, device="cpu")  # fmt: skip
        summary[spec["name"]] = {
            "architecture": sae.cfg.architecture,
            "d_sae": sae.cfg.d_sae,
            **heldout_scores(sae, heldout),
            **{k: spliced[k] for k in SPLICED},
        }
    write_json(out / "summary.json", summary)
    print_summary(summary, out, len(heldout), cfg.ce_tokens)
    return summary


def print_summary(summary: dict, out: Path, heldout_tokens: int, ce_tokens: int) -> None:
    print(f"\nheld-out evaluation ({heldout_tokens:,} tokens from 4 plays not trained on; CE loss "
          f"and KL with the SAE spliced in, on {ce_tokens:,} of them)")  # fmt: skip
    print(f"{'SAE':22s} {'arch':10s} {'d_sae':>6s} {'L0':>6s} {'expl.var':>9s} {'cosine':>7s} "
          f"{'dead':>6s} {'CE rec.':>8s} {'KL score':>9s} {'CE +SAE':>8s} {'CE clean':>9s}")  # fmt: skip
    for name, s in summary.items():
        print(f"{name:22s} {s['architecture']:10s} {s['d_sae']:6d} {s['l0']:6.1f} "
              f"{s['explained_variance']:9.3f} {s['cosine']:7.3f} {s['dead_fraction']:6.1%} "
              f"{s['ce_loss_recovered']:8.3f} {s['kl_score']:9.3f} {s['ce_sae']:8.3f} "
              f"{s['ce_clean']:9.3f}")  # fmt: skip
    print(
        f"\nlook at: {out}/sae (sae.load it), {out}/summary.json, {out}/metrics.jsonl, {out}/wandb (offline W&B run: `wandb sync`)"
    )
    print(
        f"score it fully (concept purity, absorption, on every held-out token): sae eval {out}/sae --cache {out}/heldout --tokens 0 --json {out}/sae/eval.json"
    )
