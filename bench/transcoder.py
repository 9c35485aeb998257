"""MLP transcoder against an SAE on the MLP's output, in one run on the same rows:

  transcoder  TopK, reads blocks.L.mlp.hook_in (the MLP's input after its norm), predicts
              blocks.L.hook_mlp_out
  sae         TopK of the same width and k on blocks.L.hook_mlp_out itself

  transcoder-random  the transcoder again, started with random decoder rows instead of the zero
              decoder its defaults choose (train/trainer.py's start_decoder)

All are trained in one sweep on one two-hook harvest with the library's defaults (batch 4096,
learning rate and warm-up from the run's length) and scored by `sae eval` on held-out plays:
output explained variance, and the CE loss recovered with each spliced in where the MLP's output
is. Prints each and the transcoder's ratios to the SAE; writes bench/results/transcoder-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# this file's folder holds bench/train.py: keep it from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.report import evaluate  # noqa: E402
from sae.environment import machine  # noqa: E402
from train.cache import ActivationCache  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.harvest import harvest  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=600_000, help="rows harvested and trained on")
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--cache", help="a harvest of both hookpoints to train on (default: harvest "
                    "--tokens rows in float32 into a scratch folder)")  # fmt: skip
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    hook_in, hook_out = f"blocks.{args.layer}.mlp.hook_in", f"blocks.{args.layer}.hook_mlp_out"
    scratch = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    cache = ActivationCache(args.cache) if args.cache else harvest(
        out=str(scratch / "cache"), hook=[hook_in, hook_out], tokens=args.tokens,
        dtype="float32", device="cpu")  # fmt: skip
    harvest_s = time.perf_counter() - start
    shape = {"architecture": "topk", "k": args.k, "expansion_factor": args.expansion}
    transcoder = {**shape, "hook": hook_in, "hook_out": hook_out}
    sweep = [{**transcoder, "name": "transcoder"}, {**shape, "hook": hook_out, "name": "sae"},
             {**transcoder, "decoder_init": "random", "name": "transcoder-random"}]  # fmt: skip
    cfg = TrainConfig(cache=cache.url, out=str(scratch / "train"), total_tokens=args.tokens,
                      batch_size=4096, sweep=sweep, device="cpu")  # fmt: skip
    start = time.perf_counter()
    dictionaries = Trainer(cfg, cache).run()
    train_s = time.perf_counter() - start
    scores = {}
    for name, d in zip(("transcoder", "sae", "transcoder-random"), dictionaries, strict=True):
        report = evaluate(
            d, tokens=args.eval_tokens, concepts=False, absorption=False, device="cpu"
        )
        scores[name] = {k: report[k] for k in ("explained_variance", "ce_loss_recovered", "kl_score",
                                               "l0", "dead_fraction", "ce_clean", "ce_sae")}  # fmt: skip
        s = scores[name]
        print(f"{name:17s} output explained variance {s['explained_variance']:.3f} | CE loss "
              f"recovered {s['ce_loss_recovered']:.3f} | KL score {s['kl_score']:.3f} | L0 "
              f"{s['l0']:.1f} | dead {s['dead_fraction']:.1%}", flush=True)  # fmt: skip
    shutil.rmtree(scratch, ignore_errors=True)
    ratios = {
        k: scores["transcoder"][k] / scores["sae"][k]
        for k in ("explained_variance", "ce_loss_recovered")
    }
    print(f"transcoder / sae: explained variance {ratios['explained_variance']:.3f}x, CE loss "
          f"recovered {ratios['ce_loss_recovered']:.3f}x")  # fmt: skip
    result = {
        "hooks": [hook_in, hook_out], "tokens": args.tokens, "eval_tokens": args.eval_tokens,
        "expansion": args.expansion, "k": args.k, "scores": scores, "transcoder_over_sae": ratios,
        "harvest_s": harvest_s, "train_s_all": train_s, "cache": args.cache or "harvested",
        "machine": machine(),
    }  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "transcoder-cpu.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
