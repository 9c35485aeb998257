"""Runs of `python -m train` in this process or under torchrun (gloo, CPU) on a small synthetic
cache, shared by the multi-process tests: the latent shards' and the distributed sweep's."""

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings

import torch

import sae
from sae.cli import main
from tests.conftest import HOOK, synthetic, write_cache


def failure(stderr: str) -> str:
    """A failed torchrun's first error lines (its tail is the launcher's summary, which names no
    cause)."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if "Error" in line or "terminate" in line), 0)
    return "\n".join(lines[max(0, first - 20) : first + 20])


SWEEP = """sweep:
  - {architecture: topk, k: 4, name: topk}
  - {architecture: batchtopk, k: 4, name: batchtopk}
  - {architecture: jumprelu, encoder_init: tied, pre_act_coefficient: 0, name: jumprelu}
"""
"""JumpReLU from the tied start here: its fitted start puts the thresholds amid the rows'
pre-activations, where data ranks' other order of summing gradients moves a few rows across them
(2e-3 in 10 of 4096 encoder entries after 30 steps on 2 data x 2 latent ranks). Latent shards sum
in another order too (b_dec's gradient over the latents, the decode; 1e-8 apart), and one row
that lands on the other side of a threshold, or of its kernel's edge, moves the run by a step's
worth: over seeds 0-9 at the run's rate (0.02), 2 in 10 of EVERY_RULE's fitted JumpReLUs ended
past the tolerance (either way of forming b_dec's gradient, decision 82), at 0.005 1 in 14. So
EVERY_RULE trains it from the fitted start at 0.005."""
OUT = "blocks.6.hook_mlp_out"
BEFORE, BEFORE_OUT = "blocks.5.hook_resid_post", "blocks.5.hook_mlp_out"
EVERY_RULE = f"""{SWEEP}  - {{architecture: jumprelu, lr: 0.005, name: jumprelu_fitted}}
  - {{architecture: matryoshka_batchtopk, k: 4, name: matryoshka}}
  - {{architecture: standard, name: relu}}
  - {{architecture: gated, name: gated}}
  - {{architecture: topk, k: 4, hook_out: {OUT}, skip: true, name: skip_transcoder}}
  - {{architecture: batchtopk, k: 4, hook: hook_resid_post, layers: "5,6", name: crosscoder}}
  - {{architecture: topk, k: 4, hook: hook_resid_post, hook_out: hook_mlp_out, layers: "5,6", name: clt}}
  - {{architecture: batchtopk, k: 4, hook: hook_resid_post, hook_out: hook_mlp_out, layers: "5,6",
     name: clt_batchtopk}}
"""


def launch(out, processes: int, *args: str) -> str:
    """`python -m train` in one process (this one), or torchrun's gloo processes on CPU; must
    succeed. Returns what it printed to stderr."""
    if processes == 1:
        return in_process(["train", "--out", str(out), *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]  # fmt: skip
    run = subprocess.run([*launcher, "-m", "train", "--out", str(out), *args], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, failure(run.stderr)
    return run.stderr


def in_process(argv: list[str], threads: int = 1) -> str:
    """`sae ARGV` here, as in a child with OMP_NUM_THREADS=threads (torchrun's workers have 1):
    the same float sums, without a child's start-up (6 s to train: torch, and the dynamo that
    torch's optimizers import; 10 s to harvest: transformers and the model). Returns what it
    wrote to stderr, but its warnings (a short run's advice, which a child prints unread)."""
    stderr = io.StringIO()
    with threads_of_a_child(threads), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main(argv)
    return stderr.getvalue()


@contextlib.contextmanager
def threads_of_a_child(threads: int):
    """torch on `threads` threads for the block, as a child started with OMP_NUM_THREADS=threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def common(tmp_path, config: str) -> list[str]:
    """Settings of a 30-step run on a cache of synthetic rows at HOOK and, at OUT, a nonlinear
    function of them (a transcoder's target); at BEFORE, a linear one and at BEFORE_OUT its
    image (a crosscoder's or a CLT's layer 5). The rate is high enough that some latents die, so
    that AuxK and the dead-latent counters have work to do on every rank. The warm-up is the
    two steps these runs were tuned with: over the default five, JumpReLU's thresholds carry the
    shards' other order of summation past the tolerance (0.6% of its decoder's entries 5e-4 off
    after 30 steps at this rate), while every other rule still matches."""
    _, batches = synthetic(n_features=128, d=32, batch=2_000)
    mix = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 32**0.5
    cache = write_cache(tmp_path / "cache", (
        {HOOK: x, OUT: (x @ mix).relu(), BEFORE: x @ mix.T, BEFORE_OUT: (x @ mix.T @ mix).relu()}
        for x in batches(6)
    ))  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(config)
    return ["--cache", cache.url, "--hook", HOOK, "--config", str(tmp_path / "sweep.yaml"), "--expansion-factor", "4",
            "--batch-size", "500", "--total-tokens", "15000", "--device", "cpu", "--dead-tokens", "1000", "--lr", "0.02", "--warmup-steps", "2"]  # fmt: skip


def assert_same(a_dir, b_dir, names) -> None:
    for name in names:
        a, b = sae.load(a_dir / name), sae.load(b_dir / name)
        assert b.cfg.d_sae == a.cfg.d_sae == 128
        for key, value in a.state_dict().items():
            where = f"{name}.{key}"
            torch.testing.assert_close(b.state_dict()[key], value, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, where=where: f"{where}: {m}")  # fmt: skip


def dead(run_dir, name: str) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[f"sparsity/dead_features/{name}"] for line in lines]
