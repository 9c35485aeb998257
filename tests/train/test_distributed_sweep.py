"""A distributed sweep (--distribute-sweep): each dictionary trained whole on one rank, the ranks
balanced by memory, one record of the run, and a checkpoint that one process resumes."""

import json

import pytest
import torch

import sae
from tests.conftest import HOOK
from tests.train.test_latent_shards import OUT, common, launch
from train.config import TrainConfig
from train.distributed import balance, check_sweep
from train.sources import CacheSource

SWEEP = [
    "{architecture: batchtopk, k: 4, name: batchtopk}",
    "{architecture: topk, k: 4, d_sae: 256, name: wide}",
    f"{{architecture: jumprelu, hook: {OUT}, name: jumprelu_out}}",
]
NAMES = ["batchtopk", "wide", "jumprelu_out"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-6), x["step"]


def test_a_sweep_over_two_ranks_trains_logs_and_resumes_as_one_process(tmp_path):
    """2 gloo processes: the wide SAE alone on one rank, the two narrow ones on the other (one of
    them at another hookpoint); the run's metrics.jsonl and checkpoint hold every dictionary, as
    one process's do, and one process resumes it, with the sweep listed in another order, to the
    dictionaries an uninterrupted run in one process ends with."""
    args = common(tmp_path, "sweep:\n" + "".join(f"  - {entry}\n" for entry in SWEEP))
    half, whole = ["--total-tokens", "5000"], ["--total-tokens", "10000", "--resume"]
    launch(tmp_path / "one", 1, *args, *half)
    launch(tmp_path / "one", 1, *args, *whole)
    plan = launch(tmp_path / "two", 2, *args, *half, "--distribute-sweep")
    assert "rank 0 trains wide (" in plan and "rank 1 trains batchtopk, jumprelu_out (" in plan
    assert_same_records(records(tmp_path / "two"), records(tmp_path / "one")[:10])
    (tmp_path / "reversed.yaml").write_text(
        "sweep:\n" + "".join(f"  - {entry}\n" for entry in reversed(SWEEP))
    )
    launch(tmp_path / "two", 1, *args, *whole, "--config", str(tmp_path / "reversed.yaml"))
    assert_same_records(records(tmp_path / "two"), records(tmp_path / "one"))
    for name in NAMES:
        a, b = sae.load(tmp_path / "one" / name), sae.load(tmp_path / "two" / name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, atol=1e-6, rtol=1e-6,
                                       msg=lambda m, at=f"{name}.{key}": f"{at}: {m}")  # fmt: skip


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
