"""A distributed sweep (--distribute-sweep): each dictionary trained whole on one rank, the ranks
balanced by memory, one record of the run, and the checkpoint one process writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sae
from tests.conftest import HOOK
from tests.train.runs import OUT, common, launch
from train.config import TrainConfig
from train.distributed import balance, check_sweep
from train.sources import CacheSource
from train.trainer import Trainer

NAMES = ["topk", "batchtopk", "jumprelu"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_over_two_ranks_is_the_one_process_run(one_process, tmp_path):
    """2 gloo processes share out the sweep by memory (jumprelu, one threshold a latent more,
    alone on rank 0; topk and batchtopk on rank 1); the run's dictionaries, its metrics.jsonl (every dictionary on each line) and its
    checkpoint (Adam's moments and dead-latent counts included) are one process's."""
    args, one = one_process
    two = tmp_path / "two"
    plan = launch(two, 2, *args, "--distribute-sweep")
    assert "rank 0 trains jumprelu (" in plan and "rank 1 trains topk, batchtopk (" in plan
    for name in NAMES:
        a, b = sae.load(one / name), sae.load(two / name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, atol=1e-6, rtol=1e-6,
                                       msg=lambda m, at=f"{name}.{key}": f"{at}: {m}")  # fmt: skip
    mine, theirs = records(two), records(one)
    assert len(mine) == len(theirs) == 30
    for x, y in zip(mine, theirs, strict=True):
        assert x == pytest.approx(y, abs=1e-6), x["step"]
    a, b = (load_file(run / "checkpoint" / "state.safetensors") for run in (one, two))
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=1e-6, rtol=1e-6, msg=key)


def test_a_checkpoint_finds_each_dictionary_by_name_whatever_the_sweeps_order(
    one_process, tmp_path
):
    """Resumed with the sweep listed in reverse, each member loads its own tensors (by its
    place in the sweep, it would load another dictionary's)."""
    args, one = one_process
    cfg = TrainConfig(cache=args[args.index("--cache") + 1], out=str(one), hook=HOOK, resume=True,
                      expansion_factor=4, batch_size=500, total_tokens=15000, device="cpu",
                      dead_tokens=1000, lr=float(args[args.index("--lr") + 1]),
                      warmup_steps=int(args[args.index("--warmup-steps") + 1]), sweep=[{"architecture": "jumprelu", "encoder_init": "tied", "pre_act_coefficient": 0, "name": "jumprelu"},
                      {"architecture": "batchtopk", "k": 4, "name": "batchtopk"},
                      {"architecture": "topk", "k": 4, "name": "topk"}])  # fmt: skip
    trainer = Trainer(cfg, cfg.cache)
    trainer.restore()
    assert [m.name for m in trainer.members] == ["jumprelu", "batchtopk", "topk"]
    saved = load_file(one / "checkpoint" / "state.safetensors")
    for m in trainer.members:  # the checkpoint's m0, m1, m2: the sweep's order when it was written
        prefix = f"m{NAMES.index(m.name)}.sae."
        for key, value in m.sae.state_dict().items():
            assert torch.equal(value, saved[prefix + key]), f"{m.name}.{key}"


def test_ranks_are_balanced_by_memory_and_each_gets_a_dictionary():
    assert balance([4, 1, 1, 2], 2) == [0, 1, 1, 1]
    assert balance([3, 3, 2, 2, 2], 2) == [0, 1, 0, 1, 0]
    assert balance([1, 1], 2) == [0, 1]
    with pytest.raises(ValueError, match="over 4 processes needs at least as many dictionaries, "
                       "but the sweep has 3 .*launch at most 3 processes"):  # fmt: skip
        check_sweep(NAMES, 4)
    with pytest.raises(ValueError, match="--distribute-sweep .* --latent-shards 2 .*choose one"):
        TrainConfig(distribute_sweep=True, latent_shards=2)


def test_a_rank_reads_only_its_dictionaries_hookpoints(tmp_path):
    common(tmp_path, "")
    source = CacheSource(tmp_path / "cache")
    source.open([HOOK, OUT], 500, seed=0)
    whole = next(iter(source))
    source.narrow([OUT])
    narrowed = next(iter(source))
    assert list(narrowed) == [OUT] and torch.equal(narrowed[OUT], whole[OUT])
