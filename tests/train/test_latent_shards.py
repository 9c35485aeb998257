"""Latent sharding: each rank of a latent group holds a slice of every SAE's latents; runs of 2 and
4 gloo processes end with one process's dictionaries, alone and on a (data x latent) mesh."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import sae
from tests.train.runs import EVERY_RULE, SWEEP, assert_same, common, dead, launch
from train.distributed import World, check_mesh


def test_two_latent_shards_equal_one_process(tmp_path):
    """Every rule split over 2 latent shards trains as one process does: topk, batchtopk (its
    inference threshold too), jumprelu, matryoshka (prefixes across the shards), relu, gated and a
    skip transcoder (W_skip whole on each shard), AuxK on some dead latents included; the saved
    SAEs are whole."""
    args = common(tmp_path, EVERY_RULE)
    launch(tmp_path / "one", 1, *args)
    launch(tmp_path / "two", 2, *args, "--latent-shards", "2")
    names = ["topk", "batchtopk", "jumprelu", "matryoshka", "relu", "gated", "skip_transcoder"]
    assert_same(tmp_path / "one", tmp_path / "two", names)
    for name in ("topk", "batchtopk"):
        assert dead(tmp_path / "two", name) == dead(tmp_path / "one", name)
        assert max(dead(tmp_path / "one", name)) > 0, "AuxK trained dead latents"
    # the checkpoint holds each dictionary whole, Adam's moments and dead-latent counts included
    one, two = (
        load_file(tmp_path / run / "checkpoint" / "state.safetensors") for run in ("one", "two")
    )
    assert sorted(two) == sorted(one)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-4, rtol=1e-4, msg=key)


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


def test_a_checkpoint_resumes_with_another_number_of_latent_shards(tmp_path):
    """A checkpoint is one process's, whatever the shards that wrote it: resumed split over 2
    latent shards, a run goes on as it would in one process. (A few steps on: the shards sum
    their decodes in another order, and some dozens of steps later a near-tie in a row's top k can
    go the other way, as in any data-parallel run.)"""
    args = common(tmp_path, SWEEP)
    launch(tmp_path / "one", 1, *args, "--total-tokens", "7500")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    launch(tmp_path / "one", 1, *args, "--total-tokens", "10000", "--resume")
    launch(
        tmp_path / "two", 2, *args, "--total-tokens", "10000", "--resume", "--latent-shards", "2"
    )
    assert_same(tmp_path / "one", tmp_path / "two", ["topk", "batchtopk", "jumprelu"])


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
    with pytest.raises(ValueError, match=r"clt: latent sharding splits one hookpoint's SAEs"):
        world.split_latents(torch.nn.Linear(2, 2), "clt", cpu)
    world.latent_shards, world.data_size = 2, 2
    with pytest.raises(ValueError, match=r"--batch-size 501 does not split evenly over 2 data "
                       r"ranks \(4 processes / --latent-shards 2\): make it a multiple of 2"):  # fmt: skip
        world.check_batch_size(501)
