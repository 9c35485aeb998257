"""`sae eval` and `sae dashboard` throughput, in one run on the same SAE and token windows:

  ours        eval.report.score's core (reconstruction, spliced-in CE and KL with the zero and
              mean ablations, sparsity), tokens/s
  bare        the four full forward passes that core needs per batch (clean, SAE spliced in,
              zero-ablated, mean-ablated), nothing recorded or scored
  saelens     SAELens's run_evals on the same windows and SAE with the same metrics (CE, KL,
              variance, L2, sparsity) through TransformerLens's TransformerBridge; boot excluded
  concepts    concept purity's extra time over the core
  absorption  first-letter absorption per 100 words (spelling prompts, probes, the SAE's part)
  dashboard   `sae dashboard`'s build (its one pass: evaluation with purity plus the examples, then
              the pages) against `sae eval` with purity on the same windows

The SAE is a seeded random TopK one (k fixed, so its cost is a trained one's). Everything runs on
--device (CUDA where there is one). Prints the ratios and writes bench/results/eval-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import torch

# bench/train.py sits beside this file: keep this folder from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import sae  # noqa: E402
from eval.concepts import (  # noqa: E402
    AbsorptionConfig,
    AbsorptionUndefined,
    first_letter_absorption,
    spelling,
)
from eval.dashboard import DashboardConfig, build_dashboard  # noqa: E402
from eval.report import EvalConfig, dataset_windows, score, take_tokens  # noqa: E402
from eval.saelens_evals import WindowStore, run_evals_config  # noqa: E402
from sae.environment import machine  # noqa: E402
from sae.hooks import edit  # noqa: E402
from sae.lm import load_lm, smollm2_dir  # noqa: E402
from train.device import resolve_device  # noqa: E402

HOOK = "blocks.6.hook_resid_post"
MODEL = "smollm2-135m"


def timed(fn, device: torch.device):
    """(seconds, result), the device's queue drained at both ends."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_passes(lm, ids: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """The clean pass and three edited ones (the edits as cheap as an edit can be)."""
    for batch in ids.split(batch_size):
        batch = batch.to(device)  # as the evaluation moves each batch
        lm(batch)
        for fn in (
            lambda x: x,
            torch.zeros_like,
            lambda x: x.mean((0, 1), keepdim=True).expand_as(x),
        ):
            with edit(lm, HOOK, fn):
                lm(batch)


def saelens_seconds(
    path: Path, ids: torch.Tensor, batch: int, device: torch.device
) -> tuple[float, float]:
    """(boot seconds, run_evals seconds) on the same windows."""
    import sae_lens
    from sae_lens.evals import run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from transformer_lens.model_bridge import TransformerBridge

    boot, bridge = timed(
        lambda: TransformerBridge.boot_transformers(str(smollm2_dir()), device=str(device)),
        device,
    )
    sl_sae = sae_lens.SAE.load_from_disk(path, device=str(device))
    config = run_evals_config(len(ids), batch)
    run, _ = timed(
        lambda: run_evals(
            sl_sae, WindowStore(ids.to(device), batch), bridge, ActivationScaler(), config
        ),
        device,
    )
    return boot, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens (whole windows)")
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="windows per forward pass (all; the dashboard's is EvalConfig's 8)",
    )
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--absorption-words", type=int, default=300)
    ap.add_argument("--absorption-icl", type=int, default=10, help="solved examples a prompt")
    ap.add_argument("--latents", type=int, default=50, help="dashboard pages")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = resolve_device(args.device)

    torch.manual_seed(0)
    d = sae.create("topk", d_in=576, d_sae=args.d_sae, k=args.k, hook_name=HOOK, model_name=MODEL)
    scratch = Path(tempfile.mkdtemp())
    d.save(scratch / "sae")
    d.to(device)
    lm, tokenizer = load_lm(MODEL, device=str(device))
    cfg = EvalConfig(sae=str(scratch / "sae"), context_size=args.context_size, device=str(device),
                     batch_size=args.batch_size, concepts=False, absorption=False)  # fmt: skip
    ids = take_tokens(
        dataset_windows(tokenizer, cfg), args.tokens, args.context_size, "shakespeare"
    )
    cfg.batch_size = min(cfg.batch_size, len(ids))  # run_evals takes whole batches only
    ids = ids[: len(ids) // cfg.batch_size * cfg.batch_size]
    tokens = ids[:, 1:].numel()

    if device.type == "cuda":  # kernels compiled and memory pooled before any clock starts
        score(d, lm, tokenizer, ids[: cfg.batch_size], cfg, MODEL)
    core_s, _ = timed(lambda: score(d, lm, tokenizer, ids, cfg, MODEL), device)
    bare_s, _ = timed(lambda: bare_passes(lm, ids, cfg.batch_size, device), device)
    cfg.concepts = True
    purity_s, _ = timed(lambda: score(d, lm, tokenizer, ids, cfg, MODEL), device)
    boot_s, saelens_s = saelens_seconds(scratch / "sae", ids, cfg.batch_size, device)
    print(f"core eval {tokens / core_s:,.0f} tok/s; bare forwards {tokens / bare_s:,.0f}; "
          f"SAELens run_evals {tokens / saelens_s:,.0f} (boot {boot_s:.1f} s)", flush=True)  # fmt: skip

    words = AbsorptionConfig(
        words=args.absorption_words, icl_examples=args.absorption_icl, min_letters=1
    )

    def absorption() -> None:
        # a random SAE on few words may leave it undefined: the time is spent all the same
        with suppress(AbsorptionUndefined):
            first_letter_absorption(d, spelling(lm, tokenizer, HOOK, words), words)

    absorption_s, _ = timed(absorption, device)
    dashboard = DashboardConfig(sae=str(scratch / "sae"), out=str(scratch / "site"),
                                tokens=args.tokens, context_size=args.context_size,
                                latents=args.latents, device=str(device))  # fmt: skip
    dashboard_s, _ = timed(lambda: build_dashboard(dashboard), device)
    shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "device": str(device), "tokens": tokens, "windows": len(ids), "context_size": args.context_size,
        "batch_size": cfg.batch_size, "d_sae": args.d_sae, "k": args.k,
        "tokens_per_s": {"ours": tokens / core_s, "bare": tokens / bare_s, "saelens": tokens / saelens_s},
        "seconds": {"core": core_s, "bare": bare_s, "saelens_run_evals": saelens_s,
                    "saelens_boot": boot_s, "with_concepts": purity_s, "absorption": absorption_s,
                    "dashboard": dashboard_s},
        "ours_over_bare": bare_s / core_s,
        "ours_over_saelens": saelens_s / core_s,
        "concepts_extra": purity_s / core_s - 1,
        "absorption_per_100_words_s": absorption_s * 100 / args.absorption_words,
        "absorption_icl_examples": args.absorption_icl,
        "dashboard_over_eval": dashboard_s / purity_s,
        "dashboard_latents": args.latents,
        "machine": machine(),
    }  # fmt: skip
    print(f"ours / bare forwards: {result['ours_over_bare']:.2f}x the speed (1.0 = free scoring); "
          f"ours / SAELens: {result['ours_over_saelens']:.2f}x; concept purity "
          f"{result['concepts_extra']:+.0%}; absorption {result['absorption_per_100_words_s']:.1f} s "
          f"per 100 words; dashboard / eval with purity {result['dashboard_over_eval']:.2f}x")  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"eval-{device.type}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
