"""klora.diskcache: round trips, merges, validation (corrupt/truncated/stale = miss), atomicity, LRU bound."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from klora import diskcache
from klora.diskcache import FileIndex, LayerStats, StatsCache, default_cache_dir

SHA_A = "a" * 64
SHA_B = "b" * 64


def table(n_layers: int = 5, length: int = 32, seed: int = 0) -> dict[str, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n_layers):
        top = torch.rand(length + i, generator=g).sort(descending=True).values
        out[f"unet/layer_{i}_attn1_to_q"] = LayerStats(float(torch.rand(1, generator=g)) * 1e3, top, 10_000)
    return out


def same(a: dict[str, LayerStats], b: dict[str, LayerStats]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].l1 == b[k].l1 and a[k].numel == b[k].numel and a[k].top.dtype == b[k].top.dtype == torch.float32
        and torch.equal(a[k].top, b[k].top) for k in a)


def test_round_trip(tmp_path):
    cache = StatsCache(tmp_path / "c", "engine-1")
    assert cache.get(SHA_A) == {}
    t = table()
    t["weird key/ä é \" ' \n"] = LayerStats(float("nan"), torch.zeros(0), 0)  # any str key, empty top
    assert cache.put(SHA_A, t)
    got = cache.get(SHA_A)
    assert same({k: v for k, v in got.items() if v.numel}, {k: v for k, v in t.items() if v.numel})
    nan = got["weird key/ä é \" ' \n"]
    assert nan.l1 != nan.l1 and nan.top.numel() == 0
    assert cache.get(SHA_B) == {}
    # plain tuples and tensors on other dtypes are accepted; stored as float32
    assert cache.put(SHA_B, {"x": (1.5, torch.tensor([3.0, 2.0], dtype=torch.float64), 4)})
    x = cache.get(SHA_B)["x"]
    assert (x.l1, x.numel, x.top.dtype, x.top.tolist()) == (1.5, 4, torch.float32, [3.0, 2.0])


def test_bad_digest_and_table(tmp_path):
    cache = StatsCache(tmp_path, "v")
    for bad in ("", "../" + "a" * 61, "A" * 64, "a" * 63, None):
        with pytest.raises(ValueError):
            cache.path(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.put(SHA_A, {"x": (1.0, torch.ones(2, 2), 4)})
    with pytest.raises(ValueError):
        cache.put(SHA_A, {"x": (1.0, torch.ones(5), 4)})  # more top values than entries


def test_merge_keeps_longer_tops(tmp_path):
    cache = StatsCache(tmp_path, "v")
    short = table(3, length=8)
    long = table(3, length=64)
    assert cache.put(SHA_A, short)
    q0, q1 = "unet/layer_0_attn1_to_q", "unet/layer_1_attn1_to_q"
    assert cache.put(SHA_A, {q0: long[q0], "new": long[q1]})
    got = cache.get(SHA_A)
    assert set(got) == set(short) | {"new"}
    assert torch.equal(got["unet/layer_0_attn1_to_q"].top, long["unet/layer_0_attn1_to_q"].top)
    assert torch.equal(got["unet/layer_1_attn1_to_q"].top, short["unet/layer_1_attn1_to_q"].top)
    mtime = cache.path(SHA_A).stat().st_mtime_ns
    time.sleep(0.01)
    assert cache.put(SHA_A, short)  # nothing longer: not rewritten
    assert cache.path(SHA_A).stat().st_mtime_ns == mtime
    assert torch.equal(cache.get(SHA_A)["unet/layer_0_attn1_to_q"].top, long["unet/layer_0_attn1_to_q"].top)
    # a layer whose numel changed is replaced even by a shorter list
    changed = LayerStats(1.0, torch.ones(2), 99)
    assert cache.put(SHA_A, {"new": changed})
    assert cache.get(SHA_A)["new"].numel == 99


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "flip_data", "flip_header", "flip_key",
                                    "huge_header", "pickle", "wrong_sha", "wrong_format"])
def test_damaged_entries_are_misses_and_rewritten(tmp_path, damage):
    cache = StatsCache(tmp_path, "v")
    t = table()
    assert cache.put(SHA_A, t)
    path = cache.path(SHA_A)
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "flip_data":
        data[-3] ^= 0x40
    elif damage == "flip_header":
        data[20] ^= 0x01
    elif damage == "flip_key":  # a still valid header naming another layer
        data = data.replace(b"layer_3", b"layer_9")
    elif damage == "huge_header":
        data[:8] = (2**40).to_bytes(8, "little")
    elif damage == "pickle":
        import pickle

        data = bytearray(pickle.dumps({"l1": 1}))
    elif damage in ("wrong_sha", "wrong_format"):
        other = StatsCache(tmp_path / "other", "v")
        other.put(SHA_B, t)
        data = bytearray(other.path(SHA_B).read_bytes())
        if damage == "wrong_format":
            data = data.replace(b"klora-layer-stats/1", b"klora-layer-stats/9")
    path.write_bytes(bytes(data))
    assert cache.get(SHA_A) == {}
    assert cache.put(SHA_A, {"only": t["unet/layer_0_attn1_to_q"]})  # rewritten from scratch
    assert set(cache.get(SHA_A)) == {"only"}


def test_stale_version_is_a_miss(tmp_path):
    old, new = StatsCache(tmp_path, "engine-1"), StatsCache(tmp_path, "engine-2")
    t = table()
    old.put(SHA_A, t)
    assert new.get(SHA_A) == {}
    # an entry of version 1 copied to version 2's file name: the metadata says stale
    new.path(SHA_A).write_bytes(old.path(SHA_A).read_bytes())
    assert new.get(SHA_A) == {}
    assert new.put(SHA_A, t)
    assert same(new.get(SHA_A), t)
    assert same(old.get(SHA_A), t)


def test_lru_bound(tmp_path):
    cache = StatsCache(tmp_path, "v", max_bytes=10**9)
    digests = [f"{i:064x}" for i in range(6)]
    for i, d in enumerate(digests):
        cache.put(d, table(3, 200, seed=i))
        os.utime(cache.path(d), (1000 + i, 1000 + i))  # deterministic ages: digest 0 oldest
    size = cache.path(digests[0]).stat().st_size
    cache.get(digests[0])  # a hit makes digest 0 the most recently used
    small = StatsCache(tmp_path, "v", max_bytes=int(3.5 * size))
    small.put(digests[5], table(3, 300, seed=9))  # rewrite + evict
    left = {d for d in digests if small.path(d).exists()}
    assert digests[5] in left and digests[0] in left
    assert len(left) == 3 and digests[4] in left
    total = sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())
    assert total <= 3.5 * size + size  # the rewritten entry may have grown a little


def test_foreign_files_untouched_and_tmp_cleanup(tmp_path):
    cache = StatsCache(tmp_path, "v", max_bytes=1)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.safetensors").write_bytes(b"not ours")
    stale = tmp_path / ".tmp-abc.safetensors"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    fresh = tmp_path / ".tmp-def.safetensors"
    fresh.write_bytes(b"being written")
    cache.put(SHA_A, table())
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "model.safetensors").exists()
    assert not stale.exists() and fresh.exists()
    assert not cache.path(SHA_A).exists()  # bigger than the bound: not kept
    index = FileIndex(tmp_path)
    index.put(tmp_path / "notes.txt", (tmp_path / "notes.txt").stat(), SHA_B)
    cache.clear()
    assert not fresh.exists() and (tmp_path / "model.safetensors").exists()
    assert not index.path.exists() and (tmp_path / "notes.txt").exists()


def test_unwritable_folder_is_quiet(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = StatsCache(blocker / "sub", "v")  # its parent is a file: mkdir fails
    assert cache.put(SHA_A, table()) is False
    assert cache.get(SHA_A) == {}
    cache.evict()
    cache.clear()


def test_no_temporary_files_left(tmp_path):
    cache = StatsCache(tmp_path, "v")
    for i in range(5):
        cache.put(SHA_A, table(4, 10 + i))
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path(SHA_A).name]


def _writer(folder: str, seed: int, rounds: int) -> None:
    cache = StatsCache(folder, "v")
    for i in range(rounds):
        cache.put(SHA_A, table(40, 100 + (seed * rounds + i) % 50, seed=seed))


def test_concurrent_writers_never_expose_half_files(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, 15)) for s in range(3)]
    for p in procs:
        p.start()
    cache = StatsCache(tmp_path, "v")
    seen = 0
    deadline = time.time() + 60
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        got = cache._read(cache.path(SHA_A), SHA_A)  # no touch: read only
        if got:
            seen += 1
            assert len(got) == 40 and all(v.top.numel() >= 100 for v in got.values())
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert cache.get(SHA_A)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KLORA_CACHE_DIR", raising=False)
    monkeypatch.setattr(diskcache.Path, "home", classmethod(lambda cls: Path("/home/u")))
    monkeypatch.setattr(diskcache.sys, "platform", "linux")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path("/home/u/.cache/klora")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == Path("/xdg/klora")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as the spec says
    assert default_cache_dir() == Path("/home/u/.cache/klora")
    monkeypatch.setattr(diskcache.sys, "platform", "darwin")
    assert default_cache_dir() == Path("/home/u/Library/Caches/klora")
    monkeypatch.setattr(diskcache.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    assert default_cache_dir() == tmp_path / "klora"
    monkeypatch.delenv("LOCALAPPDATA")
    assert default_cache_dir() == Path("/home/u/AppData/Local/klora")
    monkeypatch.setenv("KLORA_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_stores_topk_results(tmp_path):
    """End to end with klora.topk: stored and reloaded Top lists equal the computed ones bit for bit."""
    from klora.topk import abs_stats

    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(640, 8, generator=g), torch.randn(8, 640, generator=g)
    l1, top = abs_stats(up, down, 256)
    cache = StatsCache(tmp_path, "topk-1")
    cache.put(SHA_A, {"k": LayerStats(l1, top, 640 * 640)})
    got = cache.get(SHA_A)["k"]
    assert got.l1 == l1 and torch.equal(got.top.view(torch.int32), top.view(torch.int32))


# ------------------------------------------------------------------------------------------------ FileIndex


def _stat(path: Path, size: int, mtime_ns: int) -> os.stat_result:
    path.write_bytes(b"x" * size)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path.stat()


def test_file_index_round_trip_and_identity(tmp_path):
    index = FileIndex(tmp_path / "c")
    st = _stat(tmp_path / "a.safetensors", 10, 10**18)
    assert index.get(tmp_path / "a.safetensors", st) is None  # no index file yet
    assert index.put(tmp_path / "a.safetensors", st, SHA_A)
    assert index.get(tmp_path / "a.safetensors", st) == SHA_A
    same_file = str(tmp_path / "sub" / ".." / "a.safetensors")  # compared by real path
    assert FileIndex(tmp_path / "c").get(same_file, st) == SHA_A
    # another size or mtime is another file
    assert index.get(tmp_path / "a.safetensors", _stat(tmp_path / "a.safetensors", 11, 10**18)) is None
    assert index.get(tmp_path / "a.safetensors", _stat(tmp_path / "a.safetensors", 10, 10**18 + 1)) is None
    assert index.get(tmp_path / "b.safetensors", st) is None
    with pytest.raises(ValueError, match="sha256"):
        index.put(tmp_path / "a.safetensors", st, "not a digest")


@pytest.mark.parametrize("damage", [b"", b"{not json", b"[1, 2]", b'{"format": "other", "files": {}}',
                                    b'{"format": "klora-file-index/1", "files": []}'])
def test_file_index_damaged_is_empty_and_rewritten(tmp_path, damage):
    index = FileIndex(tmp_path)
    st = _stat(tmp_path / "a.safetensors", 10, 10**18)
    index.path.write_bytes(damage)
    assert index.get(tmp_path / "a.safetensors", st) is None
    assert index.put(tmp_path / "a.safetensors", st, SHA_A)
    assert index.get(tmp_path / "a.safetensors", st) == SHA_A


def test_file_index_entry_of_wrong_form_is_a_miss(tmp_path):
    index = FileIndex(tmp_path)
    st = _stat(tmp_path / "a.safetensors", 10, 10**18)
    key = os.path.realpath(tmp_path / "a.safetensors")
    for entry in ([10, 10**18, "A" * 64], [10, 10**18], "x", [10, 10**18, SHA_A, 1]):
        index.path.write_text(json.dumps({"format": "klora-file-index/1", "files": {key: entry}}))
        assert index.get(tmp_path / "a.safetensors", st) is None


def test_file_index_keeps_the_newest_entries(tmp_path):
    index = FileIndex(tmp_path / "c", max_entries=3)
    stats = [_stat(tmp_path / f"{i}.safetensors", 10, 10**18) for i in range(5)]
    for i, st in enumerate(stats):
        index.put(tmp_path / f"{i}.safetensors", st, f"{i:x}" * 64)
    index.put(tmp_path / "2.safetensors", stats[2], "2" * 64)  # recorded again: newest
    got = [index.get(tmp_path / f"{i}.safetensors", st) for i, st in enumerate(stats)]
    assert got == [None, None, "2" * 64, "3" * 64, "4" * 64]


def test_file_index_unwritable_folder_is_quiet(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    index = FileIndex(tmp_path / "file" / "c")  # its parent is a file: cannot be created
    st = _stat(tmp_path / "a.safetensors", 10, 10**18)
    assert index.put(tmp_path / "a.safetensors", st, SHA_A) is False
    assert index.get(tmp_path / "a.safetensors", st) is None
