"""Quality race: ours with its defaults against EleutherAI sparsify's and SAELens's trainers with
theirs, TopK k 32 at 8x, on the same cached rows in the same order, scored on the same held-out rows.

Each trainer gets `budget // 4096` batches of 4096 rows: the batches our trainer reads (the cache
shuffled with TrainConfig's default seed, through train.sources.CacheSource), handed to the others
as float32 tensors. Each trains in a fresh process of its own (no allocator or matmul-precision
setting of one reaches another), then scores itself with its own forward on every held-out row:
explained variance (centred, eval/reconstruction.py), mean L0, and the share of latents that
never fired there. rows/s is the rows trained over the wall time from building the trainer to the
end of its fit, saving included (SAELens's runner would save after it): every loop reads the cache
as it goes (ours in a read-ahead thread, as it always does; the others ask the iterator).

- ours: `train.fit(cache, architecture="topk", k=32, expansion_factor=8, total_tokens=...)`,
  everything else at TrainConfig's defaults.
- sparsify (eai-sparsify, pinned in requirements/sparsify.txt, installed into .venv/sparsify by
  bench/transcoder_speed.py's installer, with SPARSIFY_DISABLE_TRITON=1: with Triton installed it
  picks its Triton decoder even for CPU tensors; the installer sets it on CUDA too, where the eager
  decoder computes the same sums, slower): its own `Trainer.fit` drives the training, fed through
  its trainer's forward hook: the "model" is a module whose hooked submodule outputs the next
  batch, one 4096-row sequence per step (its default batch is 32 sequences of its default 2048
  tokens, 16x ours). All else is its default: SparseCoderConfig(num_latents=4608, k=32) (ReLU then
  top-k, input minus b_dec, unit-norm decoder initialised as the encoder's transpose), b_dec set
  to the first batch's mean, signum (schedule-free SignSGD, momentum 0.95, lr 5e-3 /
  sqrt(4608 / 2^14), no schedule), auxk_alpha 0 (no AuxK: dead latents are not revived), FVU loss.
  It is scored as it saves itself at the end (the schedule-free averaged weights).
- SAELens: its SAETrainer with LanguageModelSAERunnerConfig's defaults (Adam lr 3e-4, betas 0.9 /
  0.999, constant schedule, no warm-up, gradient norm clipped to 1, dead-latent window 1000 steps,
  fp32), on a TopKTrainingSAE built as its runner builds one from TopKTrainingSAEConfig(d_in,
  d_sae=4608, k=32) (AuxK coefficient 1, decoder rows initialised to norm 0.1, b_dec zero and
  subtracted from the input, activations rescaled by decoder norms, no input normalization); its
  data provider is an iterator of our batches.

Prints a line per trainer and budget and the ratios ours / sparsify and ours / SAELens; writes
bench/results/quality-<device>.json. Targets (the issue): ours >= the best of the others in
explained variance, and >= 0.90 at 600k tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from itertools import chain, islice
from pathlib import Path

import torch
from torch import Tensor, nn

# this file's folder holds bench/train.py: keep it from shadowing the `train` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eval.demo import DemoConfig, train_and_heldout  # noqa: E402
from eval.reconstruction import ReconstructionStats  # noqa: E402
from eval.sparsity import SparsityStats  # noqa: E402
from sae.environment import machine  # noqa: E402
from train.cache import ActivationCache  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.sources import CacheSource  # noqa: E402

K, EXPANSION, BATCH = 32, 8, TrainConfig.batch_size
Forward = Callable[[Tensor], tuple[Tensor, Tensor]]
"""x [n, d_in] -> (codes [n, d_sae], reconstruction [n, d_in])"""


def batches(cache: str, hook: str, steps: int) -> Iterator[Tensor]:
    """The [BATCH, d_in] float32 batches our trainer trains on, in its order."""
    source = CacheSource(cache)
    source.open([hook], BATCH, seed=TrainConfig.seed)
    return (b[hook].float() for b in islice(source, steps))


def ours(cache: str, hook: str, d_in: int, steps: int, out: Path, device: torch.device):
    from train.trainer import fit

    start = time.perf_counter()
    d = fit(cache, architecture="topk", k=K, expansion_factor=EXPANSION, hook=hook,
            total_tokens=steps * BATCH, out=str(out), overwrite=True)  # fmt: skip
    seconds = time.perf_counter() - start
    d.to(device).eval()

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        z = d.encode(x)
        return z, d.decode(z)

    return forward, seconds, metadata.version("sae-forge")


class Stream(nn.Module):
    """What sparsify's Trainer takes for the LM: its submodule `rows`, the trainer's hookpoint,
    outputs the next batch, [1, n, d_in] for input_ids [1, n]. The first is a zero row: the width
    probe the trainer runs on `dummy_inputs`."""

    def __init__(self, rows: Iterator[Tensor], d_in: int, device: torch.device):
        super().__init__()
        self.stream = chain([torch.zeros(1, d_in)], rows)
        self.rows = nn.Identity()
        self.device = device
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    def forward(self, input_ids: Tensor) -> Tensor:
        x = next(self.stream).to(self.device)
        return self.rows(x.view(*input_ids.shape, -1))


def sparsify_module(device: torch.device):
    """sparsify, installed by bench/transcoder_speed.py's installer on first use."""
    path = Path(__file__).with_name("transcoder_speed.py")
    spec = importlib.util.spec_from_file_location("transcoder_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sparsify_module(device.type)


def sparsify(cache: str, hook: str, d_in: int, steps: int, out: Path, device: torch.device):
    sparsify = sparsify_module(device)
    start = time.perf_counter()
    cfg = sparsify.TrainConfig(sparsify.SparseCoderConfig(num_latents=EXPANSION * d_in, k=K),
                               batch_size=1, hookpoints=["rows"], log_to_wandb=False,
                               save_dir=str(out))  # fmt: skip
    dataset = [{"input_ids": torch.zeros(BATCH, dtype=torch.long)}] * steps  # one sequence a step
    model = Stream(batches(cache, hook, steps), d_in, device)
    sparsify.Trainer(cfg, dataset, model).fit()
    seconds = time.perf_counter() - start
    coder = sparsify.SparseCoder.load_from_disk(out / "unnamed" / "rows", device=device)

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        o = coder(x)
        z = x.new_zeros(len(x), coder.num_latents).scatter_(1, o.latent_indices, o.latent_acts)
        return z, o.sae_out

    return forward, seconds, sparsify.__version__


def saelens(cache: str, hook: str, d_in: int, steps: int, out: Path, device: torch.device):
    import sae_lens as sl

    start = time.perf_counter()
    sae_cfg = sl.TopKTrainingSAEConfig(d_in=d_in, d_sae=EXPANSION * d_in, k=K, device=str(device))
    cfg = sl.LanguageModelSAERunnerConfig(sae=sae_cfg, training_tokens=steps * BATCH,
                                          device=str(device), logger=sl.LoggingConfig(log_to_wandb=False),
                                          checkpoint_path=None, output_path=None, verbose=False)  # fmt: skip
    sae = sl.TrainingSAE.from_dict(  # as its runner builds the SAE
        sl.TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict()
    ).to(device)
    sl.SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae,
                  data_provider=batches(cache, hook, steps)).fit()  # fmt: skip
    seconds = time.perf_counter() - start
    sae.eval()

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        z = sae.encode(x)
        return z, sae.decode(z)

    return forward, seconds, sl.__version__


TRAINERS = {"ours": ours, "sparsify": sparsify, "saelens": saelens}


@torch.no_grad()
def score(forward: Forward, heldout: str, hook: str, device: torch.device) -> dict[str, float]:
    """Explained variance (and the rest of eval/reconstruction.py), L0 and dead share, held out."""
    cache = ActivationCache(heldout)
    recon, sparsity = ReconstructionStats(), SparsityStats(EXPANSION * cache.d_in(hook))
    for x in cache.batches(4096, hook=hook, shuffle=False):
        x = x.to(device).float()
        z, x_hat = forward(x)
        recon.add(x, x_hat)
        sparsity.add(z)
    s = sparsity.result()
    return {**recon.result(), "l0": s["l0"], "dead_fraction": s["dead_fraction"]}


def trial(name: str, cache: str, heldout: str, hook: str, d_in: int, steps: int, out: str) -> dict:
    """Train one (in this process) and score it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # SAELens seeds nothing; the others seed themselves
    forward, seconds, version = TRAINERS[name](cache, hook, d_in, steps, Path(out), device)
    return {**score(forward, heldout, hook, device), "rows_per_s": steps * BATCH / seconds,
            "train_s": seconds, "version": version}  # fmt: skip


def in_own_process(*args) -> dict:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(trial, *args).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="training cache (default: SmolLM2 layer 6 on the training "
                    "plays, harvested into runs/bench/layer6/cache on first use)")  # fmt: skip
    ap.add_argument("--heldout", help="held-out cache, same hookpoint (default: the 4 held-out "
                    "plays, runs/bench/layer6/heldout)")  # fmt: skip
    ap.add_argument("--budgets", type=int, nargs="+", default=[600_000, 5_000_000], help="tokens")
    ap.add_argument("--hook", help="default: the cache's only hookpoint")
    ap.add_argument("--results", help="default: bench/results/quality-<device>.json")
    ap.add_argument("--out", default="runs/quality", help="scratch: the trainers' run directories")
    args = ap.parse_args()
    if not (args.cache and args.heldout):
        caches = train_and_heldout(Path("runs/bench/layer6"), [DemoConfig.hook], 2_000_000, 40_000)
        args.cache, args.heldout = (c.url for c in caches)
    hook = args.hook or CacheSource(args.cache).default_hook()
    d_in = ActivationCache(args.cache).d_in(hook)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for budget in args.budgets:
        steps = budget // BATCH
        scores = {}
        for name in TRAINERS:
            out = Path(args.out) / f"{name}-{budget}"
            scores[name] = s = in_own_process(
                name, args.cache, args.heldout, hook, d_in, steps, str(out)
            )
            print(f"{budget:>9,} tokens {name:>8}: explained variance {s['explained_variance']:.4f}, "
                  f"L0 {s['l0']:.1f}, dead {s['dead_fraction']:.1%}, {s['rows_per_s']:,.0f} rows/s",
                  flush=True)  # fmt: skip
        ratios = {
            f"ours_over_{other}": {
                m: scores["ours"][m] / scores[other][m]
                for m in ("explained_variance", "rows_per_s")
            }
            for other in ("sparsify", "saelens")
        }
        best = max(scores[o]["explained_variance"] for o in ("sparsify", "saelens"))
        ev = scores["ours"]["explained_variance"]
        targets = {"ours_at_least_the_best_other": ev >= best}
        if budget == 600_000:
            targets["ours_at_least_0.90"] = ev >= 0.90
        for key, r in ratios.items():
            print(f"{budget:>9,} tokens {key}: explained variance {r['explained_variance']:.3f}x, "
                  f"rows/s {r['rows_per_s']:.2f}x")  # fmt: skip
        print(f"{budget:>9,} tokens targets: {targets}")
        results.append({"budget": budget, "steps": steps, "rows": steps * BATCH, "scores": scores,
                        **ratios, "targets": targets})  # fmt: skip
    report = {"benchmark": "quality", "cache": args.cache, "heldout": args.heldout, "hook": hook,
              "heldout_rows": len(ActivationCache(args.heldout)), "d_in": d_in,
              "d_sae": EXPANSION * d_in, "k": K, "batch_size": BATCH, "results": results,
              "machine": {**machine(), "device": device}}  # fmt: skip
    path = Path(args.results or f"bench/results/quality-{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
