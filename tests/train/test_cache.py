"""The cache format without a model: shards, manifest, stats, readers, corruption, S3."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from train.cache import CacheError, CacheMismatch, CacheWriter, CorruptShard, load_cache

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]


def identity(**changes):
    base = {
        "model": "toy",
        "revision": "abc",
        "hookpoints": HOOKS,
        "d_in": {HOOKS[0]: 4, HOOKS[1]: 3},
        "dtype": "float32",
        "context_size": 8,
        "prepend_bos": True,
        "dataset": "toy",
        "pack": True,
        "seed": 0,
        "text_column": "text",
        "shard_windows": 4,
    }
    return {**base, **changes}


def shard(start, rows):
    """Rows whose values encode their global index, so any mix-up is visible."""
    idx = torch.arange(start, start + rows)
    return {
        f"acts.{HOOKS[0]}": idx[:, None].float().repeat(1, 4) + torch.arange(4) / 10,
        f"acts.{HOOKS[1]}": -idx[:, None].float().repeat(1, 3),
        "tokens": idx.to(torch.int32),
        "docs": (idx // 10).to(torch.int32),
        "positions": (idx % 7 + 1).to(torch.int32),
        "windows": idx // 7,
    }


def write(url, sizes=(10, 7, 12, 5)):
    writer = CacheWriter(url, identity())
    start = 0
    for n in sizes:
        writer.write_shard(shard(start, n))
        start += n
    writer.finish()
    return start


def test_manifest_and_stats(tmp_path):
    n = write(str(tmp_path))
    c = load_cache(tmp_path)
    assert len(c) == n == 34 and c.manifest["complete"]
    assert [s["rows"] for s in c.manifest["shards"]] == [10, 7, 12, 5]
    x = shard(0, 34)[f"acts.{HOOKS[0]}"].double()
    stats = c.stats(HOOKS[0])
    np.testing.assert_allclose(stats["mean"], x.mean(0).numpy())
    np.testing.assert_allclose(stats["mean_norm"], x.norm(dim=1).mean().item())
    np.testing.assert_allclose(
        stats["norm_scaling_factor"], math.sqrt(4) / x.norm(dim=1).mean().item()
    )
    assert c.d_in(HOOKS[1]) == 3


def test_shuffled_batches_cover_every_row_once_with_bounded_buffer(tmp_path):
    write(str(tmp_path))
    c = load_cache(tmp_path)
    batches = list(c.batches(6, hook=HOOKS[0], shuffle=True, seed=1, buffer_rows=12))
    assert all(len(b) == 6 for b in batches[:-1])
    seen = torch.cat(batches)[:, 0].long()
    assert sorted(seen.tolist()) == list(range(34))
    assert seen.tolist() != list(range(34)), "shuffled"
    again = torch.cat(list(c.batches(6, hook=HOOKS[0], shuffle=True, seed=1, buffer_rows=12)))
    torch.testing.assert_close(again, torch.cat(batches)), "same seed, same order"
    ordered = torch.cat(list(c.batches(5, hook=HOOKS[1], shuffle=False)))
    assert (-ordered[:, 0]).long().tolist() == list(range(34))
    assert len(list(c.batches(5, hook=HOOKS[1], shuffle=False, drop_last=True))) == 6


def test_random_access_rows(tmp_path):
    write(str(tmp_path))
    c = load_cache(tmp_path)
    index = [33, 0, 17, 9, 10, 16]
    assert c.rows(index, "tokens").tolist() == index
    torch.testing.assert_close(c.rows(index, HOOKS[0])[:, 0], torch.tensor(index).float())
    with pytest.raises(IndexError):
        c.rows([34], "tokens")
    with pytest.raises(KeyError, match="has no hookpoint 'blocks.9.hook_resid_post'"):
        c.rows([1], "blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match="several hookpoints"):
        next(c.batches(4))


def test_flipped_byte_is_detected_naming_the_shard(tmp_path):
    write(str(tmp_path))
    path = tmp_path / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    c = load_cache(tmp_path)
    with pytest.raises(CorruptShard, match="shard-00002.safetensors fails its sha256"):
        c.verify()
    with pytest.raises(CorruptShard, match="shard-00002"):
        list(c.batches(4, hook=HOOKS[0]))


def test_truncated_shard_is_detected_naming_the_shard(tmp_path):
    write(str(tmp_path))
    path = tmp_path / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    c = load_cache(tmp_path)
    with pytest.raises(CorruptShard, match="shard-00001.safetensors has .* bytes.*truncated"):
        c.verify()
    with pytest.raises(CorruptShard, match="shard-00001"):
        c.rows([12], "tokens")


def edit_manifest(folder, fn):
    manifest = json.loads((folder / "manifest.json").read_text())
    fn(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["shards"][1].update(rows=5), "token_count 34 but its shards hold 32 rows"),
        (lambda m: (m["shards"][1].update(rows=5), m.update(token_count=32)),
         "shard-00001.safetensors, .*: 7 rows, the manifest says 5"),
        (lambda m: m.update(dtype="bfloat16"), "dtype torch.float32, the manifest says bfloat16"),
        (lambda m: m["d_in"].update({HOOKS[0]: 100}), "width 4, the manifest says 100"),
        (lambda m: m["hookpoints"].append("blocks.3.hook_resid_post"),
         r"hookpoints and d_in disagree on \['blocks.3.hook_resid_post'\]"),
        (lambda m: (m["hookpoints"].remove(HOOKS[1]), m["d_in"].pop(HOOKS[1])),
         rf"hookpoints and stats disagree on \['{HOOKS[1]}'\]"),
        (lambda m: (m["shards"].append(m["shards"][0]), m.update(token_count=44)),
         r"shards \['shard-00000.safetensors'\] listed more than once"),
    ],
)  # fmt: skip
def test_a_manifest_that_misdescribes_its_shards_is_refused(tmp_path, edit, message):
    """The sha256 vouches for a shard's bytes, not for the manifest's rows, dtype, widths or
    hookpoints: an edited manifest made the reader return rows from the wrong places."""
    write(str(tmp_path))
    edit_manifest(tmp_path, edit)
    with pytest.raises((CorruptShard, CacheError), match=message):
        c = load_cache(tmp_path)
        c.verify()
    if any(word in message for word in ("token_count", "disagree", "more than once")):
        return  # refused when the manifest is read: there is no reader to try further
    with pytest.raises(CorruptShard, match=message):  # random access is refused like the batches
        c.rows([12], "tokens" if "rows" in message else HOOKS[0])
    with pytest.raises(CorruptShard, match=message):
        list(c.batches(4, hook=HOOKS))


def test_reopening_resumes_and_mismatch_is_refused(tmp_path):
    writer = CacheWriter(str(tmp_path), identity())
    writer.write_shard(shard(0, 10))
    left = tmp_path / ".shard-00001.safetensors.x1y2.tmp"  # what a SIGKILL mid-write leaves
    left.write_bytes(b"half a shard")
    with pytest.raises(CacheMismatch):
        CacheWriter(str(tmp_path), identity(model="gpt2"))
    assert left.exists(), "a refused harvest touches nothing"
    again = CacheWriter(str(tmp_path), identity())
    assert again.shards_done == 1 and again.rows_done == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
    ]
    with pytest.raises(CacheMismatch, match=r"hookpoints: cache has .*blocks.1.hook_resid_post"):
        CacheWriter(str(tmp_path), identity(hookpoints=["blocks.1.hook_resid_post"]))
    with pytest.raises(CacheMismatch, match="model: cache has 'toy', this harvest 'gpt2'"):
        CacheWriter(str(tmp_path), identity(model="gpt2"))
    # a resume starts after shards x shard_windows windows: another shard size repeats or skips
    with pytest.raises(CacheMismatch, match="shard_windows: cache has 4, this harvest 2"):
        CacheWriter(str(tmp_path), identity(shard_windows=2))


def test_no_temporary_files_left_and_manifest_is_json(tmp_path):
    write(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [
        f"shard-0000{i}.safetensors" for i in range(4)
    ]
    json.loads((tmp_path / "manifest.json").read_text())


def test_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        load_cache(tmp_path / "nope")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: [1, 2], "should be a JSON object, not list"),
        (lambda m: {k: v for k, v in m.items() if k not in ("shards", "stats")},
         r"missing keys \['shards', 'stats'\]"),
    ],
)  # fmt: skip
def test_a_malformed_manifest_is_named(tmp_path, edit, message):
    write(str(tmp_path))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CacheError, match=r"manifest.json.*" + message):
        load_cache(str(tmp_path))
    with pytest.raises(CacheError, match=message):
        CacheWriter(str(tmp_path), identity())


def test_an_unfinished_cache_is_read_with_a_warning(tmp_path):
    writer = CacheWriter(str(tmp_path), identity())
    writer.write_shard(shard(0, 10))
    with pytest.warns(UserWarning, match=r"an unfinished harvest \(10 tokens so far\)"):
        assert len(load_cache(str(tmp_path))) == 10
    writer.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_cache(str(tmp_path))


def test_s3_write_read_resume(s3_bucket):
    url = f"{s3_bucket}/runs/cache"
    writer = CacheWriter(url, identity())
    writer.write_shard(shard(0, 10))
    resumed = CacheWriter(url, identity())  # a new process would see the same manifest
    assert resumed.shards_done == 1
    resumed.write_shard(shard(10, 7))
    resumed.finish()
    c = load_cache(url)
    assert len(c) == 17
    c.verify()
    assert sorted(torch.cat(list(c.batches(4, hook=HOOKS[0])))[:, 0].long().tolist()) == list(
        range(17)
    )
    assert c.rows([16, 3], "tokens").tolist() == [16, 3]


def test_a_misspelt_bucket_is_refused_not_created(s3_bucket):
    import s3fs

    with pytest.raises(FileNotFoundError, match=r"bucket 'no-such-bucket' does not exist"):
        CacheWriter("s3://no-such-bucket/cache", identity())
    assert not s3fs.S3FileSystem().exists("no-such-bucket")
    CacheWriter(f"{s3_bucket}/new/cache", identity())  # an existing bucket: a new prefix is fine


def test_missing_credentials_are_not_reported_as_a_missing_bucket(s3_server, monkeypatch):
    """`exists` answered False without credentials: harvest said the bucket did not exist."""
    import s3fs
    from botocore.exceptions import NoCredentialsError

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(NoCredentialsError):
        CacheWriter("s3://nobucket/cache", identity())
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_scheme_without_its_package_names_what_to_install(monkeypatch):
    import fsspec

    def missing(url, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(ValueError, match=r"cannot open gs://b/c: Install gcsfs"):
        load_cache("gs://b/c")


@pytest.mark.parametrize("size", [0, -5, 2.5, True])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_at_the_call(tmp_path, size):
    """batches(0) divided by zero at the first batch, batches(-5) yielded nothing."""
    write(str(tmp_path))
    with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {size!r}"):
        load_cache(tmp_path).batches(size, hook=HOOKS[0])


def test_a_shard_number_past_the_end_is_named(tmp_path):
    write(str(tmp_path))
    with pytest.raises(IndexError, match=r"has shards 0\.\.3, not 99"):
        load_cache(tmp_path).read_shard(99)


def counting_reads(monkeypatch, c) -> list[int]:
    """Bytes the cache fetches, whole shards and ranges alike, one entry per read."""
    read = []
    cat_file, cat_ranges = c.fs.cat_file, c.fs.cat_ranges

    def whole(*args, **kwargs):
        read.append(len(data := cat_file(*args, **kwargs)))
        return data

    def ranges(*args, **kwargs):
        data = cat_ranges(*args, **kwargs)
        read.extend(len(d) for d in data)
        return data

    monkeypatch.setattr(c.fs, "cat_file", whole)
    monkeypatch.setattr(c.fs, "cat_ranges", ranges)
    return read


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_rank_reads_its_part_of_every_global_batch_and_about_half_the_bytes(
    tmp_path, monkeypatch, request, where
):
    """Two ranks' batches, side by side, are one process's batches (same seed), and each rank
    reads well under the bytes one process reads (every rank read all of them before)."""
    url = request.getfixturevalue("s3_bucket") + "/c" if where == "s3" else str(tmp_path)
    write(url, sizes=(1000, 900, 1100, 1000, 950, 1050, 1000, 1000))
    args = dict(hook=HOOKS, shuffle=True, seed=3, buffer_rows=2000, drop_last=True)
    read = counting_reads(monkeypatch, c := load_cache(url))
    one = list(c.batches(400, **args))
    one_bytes = sum(read)
    ranks = []
    for rank in (0, 1):
        read.clear()
        c = load_cache(url)  # a process of its own: nothing read before
        read = counting_reads(monkeypatch, c)
        ranks.append(list(c.batches(400, **args, rank=rank, ranks=2)))
        assert sum(read) < 0.6 * one_bytes, f"rank {rank} read {sum(read)} of {one_bytes} bytes"
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 20
    for batch, part0, part1 in zip(one, *ranks, strict=True):
        for hook in HOOKS:
            torch.testing.assert_close(torch.cat([part0[hook], part1[hook]]), batch[hook])
    seen = torch.cat([b[HOOKS[0]][:, 0] for b in one]).long()
    assert len(set(seen.tolist())) == 8000 and seen.tolist() != sorted(seen.tolist()), "shuffled"
    with pytest.raises(ValueError, match="rank 2 is not one of ranks 0..1"):
        c.batches(100, hook=HOOKS, rank=2, ranks=2)
