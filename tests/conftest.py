"""Shared test set-up: no network, quiet libraries, small builders, and the real SmolLM2 once."""

import os

# Before anything imports huggingface_hub: it reads these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton's kernels run in its interpreter on CPU tensors (tests/sae/test_triton.py).
# It must be chosen before triton is first imported: its own helpers are decorated at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sae  # noqa: E402
from train.cache import ActivationCache, CacheWriter  # noqa: E402


class TopkSizes(torch.overrides.TorchFunctionMode):
    """Records the number of entries of every Tensor.topk call made inside it: shows which path a
    selection took (a topk over the whole input, or over a pruned few)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.topk:
            self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


def make_sae(
    architecture: str, d_in: int = 6, d_sae: int = 16, k: int = 3, seed: int = 0, **fields
) -> sae.SAE:
    """A small SAE with every parameter random (biases and thresholds too), so that no term of
    the architecture's equation can hide behind a zero."""
    torch.manual_seed(seed)
    d = sae.create(architecture, d_in=d_in, d_sae=d_sae, k=k, **fields)
    with torch.no_grad():
        for name, tensor in d.state_dict().items():
            if name == "threshold" and architecture == "jumprelu":
                tensor.copy_(torch.rand_like(tensor) * 0.3)
            elif name == "threshold":  # BatchTopK family: one threshold shared by all latents
                tensor.fill_(0.15)
            elif name in ("r_mag",):
                tensor.copy_(torch.randn_like(tensor) * 0.2)
            else:
                tensor.copy_(torch.randn_like(tensor) * 0.5)
    return d


@pytest.fixture(scope="session")
def smollm2():
    from sae.lm import load_lm

    return load_lm("smollm2-135m")


def start_sae(*args: str):
    """`sae ARGS...` in a child process (so that it can be SIGKILLed), two threads like CI; its
    idle OpenMP threads sleep rather than spin on the core the other test worker needs."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "sae.cli", *args]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
        preexec_fn=as_from_a_shell,
    )


def as_from_a_shell() -> None:
    """Ctrl-C as a terminal's child gets it: SIGINT at its default and unblocked. A child inherits
    ignored and blocked signals across exec, and a suite started in the background by a
    non-interactive shell (`make test &`) has SIGINT ignored: the Ctrl-C test's harvest then
    never saw its signal (found with a per-test probe: ignored from the first test on)."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sigkill_when(proc, json_file, ready, timeout: float = 180) -> None:
    """SIGKILL `proc` as soon as `ready(json.load(json_file))` holds (polled every 20 ms)."""
    import json
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ready(json.loads(json_file.read_text())):
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


HOOK = "blocks.6.hook_resid_post"
"""The hookpoint synthetic caches claim."""


def synthetic(n_features=64, d=32, p=0.04, batch=2048, seed=0):
    """Activations that are sparse non-negative combinations of known unit features."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)

    def batches(n=10**9):
        for _ in range(n):
            on = torch.rand(batch, n_features, generator=g) < p
            yield (on * (0.5 + torch.rand(batch, n_features, generator=g))) @ features

    return features, batches


def synthetic_cache(path, rows=20_000, d=64, shard_rows=2_000, seed=0, nan_row=None):
    """A cache of synthetic() rows; row `nan_row` of the first shard has a NaN."""
    _, batches = synthetic(n_features=4 * d, d=d, batch=shard_rows, seed=seed)

    def shards():
        for i, x in enumerate(batches(rows // shard_rows)):
            if i == 0 and nan_row is not None:
                x[nan_row, 3] = float("nan")
            yield {HOOK: x}

    return write_cache(path, shards())


def write_cache(path, shards):
    """A cache of the given {hook: [rows, d]} shards, with made-up token metadata."""
    writer, first = None, 0
    for shard in shards:
        if writer is None:
            identity = {"model": "synthetic", "revision": "0", "hookpoints": list(shard),
                        "d_in": {h: x.shape[-1] for h, x in shard.items()}, "dtype": "float32",
                        "context_size": 128, "prepend_bos": True, "dataset": "synthetic",
                        "pack": True, "seed": 0}  # fmt: skip
            writer = CacheWriter(str(path), identity)
        n = len(next(iter(shard.values())))
        meta = torch.arange(first, first + n)
        first += n
        acts = {f"acts.{h}": x for h, x in shard.items()}
        writer.write_shard({**acts, "tokens": meta.int(), "docs": meta.int(),
                            "positions": meta.int(), "windows": meta})  # fmt: skip
    writer.finish()
    return ActivationCache(str(path))


REPO = "someorg/tiny-trajectory"
"""A model with two revisions in a local hub cache (the `trajectory` fixture)."""
COMMITS = {"main": "a" * 40, "step1": "b" * 40}


def tiny_model(seed: int):
    """A two-layer Llama, 16 wide, with SmolLM2's vocabulary, from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def trajectory(tmp_path, monkeypatch):
    """A hub cache (offline) holding two revisions of a small Llama with SmolLM2's tokenizer,
    laid out as huggingface_hub writes them: refs/<revision> naming a snapshot's commit."""
    import shutil

    import huggingface_hub.constants

    from sae.lm import smollm2_dir

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    models = {}
    for seed, (revision, commit) in enumerate(COMMITS.items()):
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        models[revision] = tiny_model(seed)
        models[revision].save_pretrained(snapshot)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_dir() / name, snapshot / name)
    return models, repo
