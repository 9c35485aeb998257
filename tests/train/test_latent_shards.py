"""Latent sharding: each rank of a latent group holds a slice of every SAE's latents; runs of 2 and
4 gloo processes end with one process's dictionaries, alone and on a (data x latent) mesh."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae import models
from tests.train.runs import EVERY_RULE, assert_same, common, dead, launch
from train import checkpoint
from train.distributed import World, check_mesh

NAMES = [
    "topk", "batchtopk", "jumprelu", "jumprelu_fitted", "matryoshka", "relu", "gated",
    "skip_transcoder", "crosscoder", "clt", "clt_batchtopk",
]  # fmt: skip
"""EVERY_RULE's dictionaries."""


@pytest.fixture(scope="module")
def every_rule(tmp_path_factory):
    """EVERY_RULE's run in one process and over 2 latent shards: the settings and both runs."""
    tmp_path = tmp_path_factory.mktemp("every_rule")
    args = common(tmp_path, EVERY_RULE)
    launch(tmp_path / "one", 1, *args)
    launch(tmp_path / "two", 2, *args, "--latent-shards", "2")
    return args, tmp_path / "one", tmp_path / "two"


def test_two_latent_shards_equal_one_process(every_rule, tmp_path):
    """Every rule split over 2 latent shards trains as one process does: topk, batchtopk (its
    inference threshold too), jumprelu (from both starts), matryoshka (prefixes across the
    shards), relu, gated, a skip transcoder (W_skip whole on each shard), a BatchTopK crosscoder
    and TopK and BatchTopK cross-layer transcoders over two layers (each layer's latents split),
    AuxK on some dead latents included; the saved dictionaries are whole."""
    _, one_dir, two_dir = every_rule
    assert_same(one_dir, two_dir, NAMES)
    for name in ("topk", "batchtopk"):
        assert dead(two_dir, name) == dead(one_dir, name)
        assert max(dead(one_dir, name)) > 0, "AuxK trained dead latents"
    # each shard wrote its slice of every per-latent tensor, none the whole; read whole, the
    # checkpoint is one process's (Adam's moments and dead-latent counts included)
    folder = two_dir / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == [
        "shard-0-of-2.safetensors", "shard-1-of-2.safetensors", "state.json", "state.safetensors"
    ]  # fmt: skip
    part = load_file(folder / "shard-1-of-2.safetensors")
    assert part["m0.sae.W_enc"].shape == (32, 64) and part["m0.sae.W_dec"].shape == (64, 32)
    assert "m0.sae.W_dec" not in load_file(folder / "state.safetensors")
    (one, _), (two, _) = (checkpoint.load(run) for run in (one_dir, two_dir))
    assert set(two) == set(one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-4, msg=key)
    # damage a copy: the resume test below goes on from the checkpoint
    folder = shutil.copytree(folder, tmp_path / "damaged" / "checkpoint")
    data = bytearray((folder / "shard-1-of-2.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the file's last tensor
    (folder / "shard-1-of-2.safetensors").write_bytes(bytes(data))
    stored, _ = checkpoint.load(tmp_path / "damaged")
    half = stored.read("m0.sae.W_dec", 0, 0, 64)  # shard 0's latents: its file alone is opened
    torch.testing.assert_close(half, one["m0.sae.W_dec"][:64], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"checkpoint is damaged \(shard-1-of-2.safetensors fails"):
        stored.read("m0.sae.W_dec", 0, 32, 64)  # half of each file


def test_four_latent_shards_equal_one_process(one_process, tmp_path):
    args, one = one_process
    launch(tmp_path / "four", 4, *args, "--latent-shards", "4")
    assert_same(one, tmp_path / "four", ["topk", "batchtopk", "jumprelu"])


def test_a_data_by_latent_mesh_equals_one_process_for_per_row_rules(one_process, tmp_path):
    """4 processes as 2 data ranks x 2 latent shards: the per-row rules end as one process's
    (BatchTopK selects within each data rank's rows, as in any data-parallel run)."""
    args, one = one_process
    launch(tmp_path / "mesh", 4, *args, "--latent-shards", "2")
    assert_same(one, tmp_path / "mesh", ["topk", "jumprelu"])
    assert dead(tmp_path / "mesh", "topk") == dead(one, "topk")


def test_a_sharded_checkpoint_resumes_with_any_number_of_latent_shards(every_rule, tmp_path):
    """The 2 latent shards' checkpoint of every rule (the test above) resumed over 4 shards (each
    reads a part of one file) and in one process (reading both whole): the run goes on alike, and
    as the one process's checkpoint of the same run would (the test above: the same tensors). (A
    few steps on, 1e-7 apart: the shards sum their decodes in another order, and some dozens of
    steps later a near-tie in a row's top k can go the other way, as in any data-parallel run.)"""
    args, _, two_dir = every_rule
    for run in ("one", "four"):
        shutil.copytree(two_dir, tmp_path / run)
    launch(tmp_path / "one", 1, *args, "--total-tokens", "17500", "--resume")
    launch(
        tmp_path / "four", 4, *args, "--total-tokens", "17500", "--resume", "--latent-shards", "4"
    )
    assert_same(tmp_path / "one", tmp_path / "four", NAMES)
    assert (tmp_path / "four" / "checkpoint" / "shard-3-of-4.safetensors").exists()


@pytest.mark.parametrize("transcoder", [False, True])
def test_a_latent_shard_builds_its_slice_as_the_whole_starts_it(monkeypatch, transcoder):
    """Each rank builds only its latents (no rank holds the whole dictionary), drawn a block of
    rows at a time: every tensor equals the whole's slice, for every rule, and the random stream
    ends where building the whole leaves it (training draws on alike)."""
    monkeypatch.setattr(models, "DRAW_BLOCK", 7 * 24)  # blocks of 7 rows: shards cut through them
    fields = dict(d_in=24, d_sae=48, k=4, apply_b_dec_to_input=not transcoder, skip=transcoder)
    for architecture in sae.ARCHITECTURES:
        torch.manual_seed(0)
        whole = sae.create(architecture, **fields)
        after = torch.get_rng_state()
        for first in (0, 16, 32):
            torch.manual_seed(0)
            part = type(whole)(whole.cfg, latents=range(first, first + 16))
            assert torch.equal(torch.get_rng_state(), after), architecture
            for name, value in whole.state_dict().items():
                dim = whole.latent_dim(name)
                expected = value if dim is None else value.narrow(dim, first, 16)
                assert torch.equal(part.state_dict()[name], expected), f"{architecture}.{name}"


def test_a_mesh_or_width_that_does_not_split_is_refused_naming_both_numbers():
    with pytest.raises(ValueError, match=r"--latent-shards 3 does not divide the 4 processes .*"
                       r"use one of \[1, 2, 4\], or launch a multiple of 3"):  # fmt: skip
        check_mesh(4, 3)
    world = World()
    world.size, world.latent_shards, world.data_size = 4, 3, 1
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"x100: d_sae 100 does not split over --latent-shards 3: "
                       r"make --d-sae \(or --expansion-factor x d_in\) a multiple of 3 \(say 99\)"):  # fmt: skip
        world.split_latents(sae.create("topk", d_in=8, d_sae=100, k=4), "x100", cpu)
    with pytest.raises(ValueError, match=r"k 40 is more than a latent shard's 33 latents"):
        world.split_latents(sae.create("batchtopk", d_in=8, d_sae=99, k=40), "x99", cpu)
    world.latent_shards, world.data_size = 2, 2
    with pytest.raises(ValueError, match=r"--batch-size 501 does not split evenly over 2 data "
                       r"ranks \(4 processes / --latent-shards 2\): make it a multiple of 2"):  # fmt: skip
        world.check_batch_size(501)
