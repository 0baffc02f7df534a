"""klora.topk: L1 and Top-K of |U| equal the naive method bit for bit, on every shape, k and tie pattern."""

from __future__ import annotations

import math

import pytest
import torch

from klora import topk as T
from klora.topk import Workspace, abs_stats, dense_abs_stats

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive(up: torch.Tensor, down: torch.Tensor, k: int) -> torch.Tensor:
    u = (up.to(torch.float32) @ down.to(torch.float32)).abs()
    return torch.topk(u.flatten(), max(0, min(k, u.numel()))).values


def naive_dense(u: torch.Tensor, k: int) -> torch.Tensor:
    a = u.to(torch.float32).abs().flatten()
    return torch.topk(a, max(0, min(k, a.numel()))).values


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, bit for bit (NaN payloads included)."""
    return a.dtype == b.dtype == torch.float32 and a.shape == b.shape and a.device == b.device and \
        torch.equal(a.view(torch.int32), b.view(torch.int32))


def l1_reference(up: torch.Tensor, down: torch.Tensor) -> float:
    """Σ|U| of the float32 product U, summed exactly (float64 sums of float32 values, fsum of rows)."""
    u = (up.to(torch.float32) @ down.to(torch.float32)).abs().double()
    return math.fsum(u.sum(1).tolist())


def check(up: torch.Tensor, down: torch.Tensor, k: int, ws: Workspace | None = None) -> None:
    l1, top = abs_stats(up, down, k, ws)
    ref = naive(up, down, k)
    assert same_bits(top, ref), (tuple(up.shape), tuple(down.shape), k)
    exact = l1_reference(up.cpu(), down.cpu())
    if math.isfinite(exact) and exact > 0:
        assert abs(l1 - exact) <= 1e-6 * exact
    elif exact == 0:
        assert l1 == 0.0


def factors(m: int, n: int, r: int, seed: int, device: str = "cpu", kind: str = "gauss"):
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    if kind == "ints":  # many ties and exact zeros
        up, down = up.mul(1.5).round(), down.mul(1.5).round()
    elif kind == "rows":  # heavy-tailed row and column scales (trained-LoRA-like)
        up = up * torch.exp(2 * torch.randn(m, 1, generator=g))
        down = down * torch.exp(2 * torch.randn(1, n, generator=g))
    return up.to(device), down.to(device)


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("device", DEVICES)
def test_random_shapes_and_k(device):
    g = torch.Generator().manual_seed(1)
    ws = Workspace()
    for trial in range(200):
        choice = trial % 5  # k: 1, numel, > numel, r², random; big k (a full sort) on smaller shapes
        m, n = (int(v) for v in torch.randint(1, 300 if choice in (1, 2, 4) else 900, (2,), generator=g))
        r = int(torch.randint(1, 40, (1,), generator=g))
        kind = ("gauss", "ints", "rows")[trial % 3]
        up, down = factors(m, n, r, trial, device, kind)
        random_k = int(torch.randint(1, m * n + 1, (1,), generator=g))
        k = {0: 1, 1: m * n, 2: m * n + 7, 3: r * r}.get(choice, random_k)
        check(up, down, k, ws if trial % 2 else None)


@pytest.mark.parametrize("device", DEVICES)
def test_walk_random(device):
    """Shapes and k that always take the chunk walk (k up to the number of 16-row chunks)."""
    g = torch.Generator().manual_seed(2)
    ws = Workspace()
    for trial in range(40):
        m = int(torch.randint(32, 1500, (1,), generator=g))
        n = int(torch.randint(max(2, 32769 // m), 1500, (1,), generator=g))
        chunks = -(-m // 16) * n
        k = int(torch.randint(1, min(chunks, 20000) + 1, (1,), generator=g))
        up, down = factors(m, n, int(torch.randint(1, 33, (1,), generator=g)), 100 + trial, device,
                           ("gauss", "ints", "rows")[trial % 3])
        check(up, down, k, ws)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("m", "n", "r", "k"), [
    (1280, 1280, 32, 1024), (1280, 2048, 32, 1024), (640, 640, 32, 1024), (640, 2048, 8, 256),
    (1281, 1279, 16, 256), (1295, 700, 4, 16), (4096, 320, 64, 4096), (320, 4096, 64, 4096),
    (33, 33000, 8, 64), (5000, 40, 8, 64), (31, 5000, 8, 100), (17, 20000, 2, 4), (3, 100000, 4, 16),
    (100000, 3, 4, 16), (16, 16, 1, 3), (1, 1, 1, 1), (1, 50000, 3, 9), (50000, 1, 3, 9),
    (2048, 2048, 128, 16384), (1280, 1280, 32, 200000), (512, 512, 32, 1),
])
def test_layer_shapes(device, m, n, r, k):
    for kind in ("gauss", "ints", "rows"):
        up, down = factors(m, n, r, m + n + r, device, kind)
        check(up, down, k)


@pytest.mark.parametrize("device", DEVICES)
def test_k_edges(device):
    up, down = factors(300, 500, 8, 3, device)
    for k in (0, -5, 1, 2, 15, 16, 17, 255, 256, 257, 4095, 150000 - 1, 150000, 10**9):
        check(up, down, k)
    assert abs_stats(up, down, 0)[1].shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_zeros_and_constant_matrices(device):
    ones_up, ones_down = torch.ones(700, 4, device=device), torch.ones(4, 900, device=device)
    for k in (1, 100, 1024, 630000):
        check(ones_up, ones_down, k)  # every entry equal
        check(torch.zeros(700, 4, device=device), ones_down, k)  # all zero
    up = torch.zeros(1000, 8, device=device)
    up[::37] = 1.0  # a few non-zero rows: most chunks are all zero, the K-th value is often 0
    check(up, torch.ones(8, 1000, device=device), 5000)
    check(up, torch.ones(8, 1000, device=device), 27 * 1000 + 5)
    # only two distinct values, the K-th in the middle of a long run of ties
    g = torch.Generator().manual_seed(5)
    up2 = (torch.rand(900, 1, generator=g) < 0.3).float().to(device) + 1.0
    check(up2, torch.ones(1, 900, device=device), 10**5)


@pytest.mark.parametrize("device", DEVICES)
def test_clustered_top_values(device):
    """Adversarial layouts for the chunk walk: the Top-K inside one column, one 16-row chunk, one
    256-row strip, one row; Cauchy–Schwarz tight (rank 1, aligned vectors)."""
    g = torch.Generator().manual_seed(7)
    m, n, r = 1024, 1024, 8
    base_up, base_down = torch.randn(m, r, generator=g) * 1e-3, torch.randn(r, n, generator=g) * 1e-3
    cases = []
    down = base_down.clone()
    down[:, 77] *= 1e4  # one column dominates: all Top-K in column 77
    cases.append((base_up, down))
    up = base_up.clone()
    up[16 * 5:16 * 6] *= 1e4  # one 16-row chunk of rows dominates
    cases.append((up, base_down))
    up = base_up.clone()
    up[256:512] *= 1e4  # one 256-row strip (a chunk of the second table)
    cases.append((up, base_down))
    up = base_up.clone()
    up[999] *= 1e4  # one row dominates
    cases.append((up, base_down))
    v = torch.randn(1, r, generator=g)
    cases.append((torch.linspace(1, 2, m).unsqueeze(1) * v, v.t() * torch.linspace(2, 1, n)))  # rank 1
    sorted_up = torch.arange(m, dtype=torch.float32).unsqueeze(1).repeat(1, r)  # values grow down the rows
    cases.append((sorted_up, torch.ones(r, n)))
    for up, down in cases:
        for k in (1, 16, 17, 64, 256, 1024, 4096, 16 * 1024 + 1):
            check(up.to(device), down.to(device), k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_are_converted_first(device, dtype):
    up, down = factors(700, 650, 16, 11, device)
    up, down = up.to(dtype), down.to(dtype)
    top = abs_stats(up, down, 256)[1]
    assert same_bits(top, naive(up, down, 256))
    assert top.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_dense(device):
    g = torch.Generator().manual_seed(3)
    for shape, k in [((640, 640), 1024), ((1280, 2048), 1024), ((320, 320, 3, 3), 4096), ((17, 3000), 50),
                     ((5, 7), 100), ((40000,), 10), ((700, 900), 700 * 900)]:
        u = torch.randn(*shape, generator=g).to(device)
        u[..., :3] = 0.0
        before = u.clone()
        l1, top = dense_abs_stats(u, k)
        assert torch.equal(u, before)  # not modified
        assert same_bits(top, naive_dense(u, k))
        exact = math.fsum(u.abs().double().flatten().tolist())
        assert abs(l1 - exact) <= 1e-6 * exact
    h = torch.randn(600, 600, generator=g).half().to(device)
    assert same_bits(dense_abs_stats(h, 300)[1], naive_dense(h, 300))


@pytest.mark.parametrize("device", DEVICES)
def test_inf_and_nan_follow_topk(device):
    up, down = factors(800, 800, 4, 9, device)
    up[3, 0] = 3e38
    down[0, 5:9] = 3e38  # inf entries
    check(up, down, 100)
    up2 = up.clone()
    up2[10] = float("inf")
    down2 = down.clone()
    down2[:, 11] = 0.0  # inf · 0: NaN entries
    l1, top = abs_stats(up2, down2, 100)
    assert math.isnan(l1)
    assert same_bits(top, naive(up2, down2, 100))


def test_workspace_reuse_and_no_aliasing():
    ws = Workspace()
    results = []
    for seed, (m, n) in enumerate([(1280, 2048), (64, 64), (640, 640), (1500, 1500), (33, 40000)]):
        up, down = factors(m, n, 8, seed)
        top = abs_stats(up, down, 300, ws)[1]
        results.append((top.clone(), top, naive(up, down, 300)))
    ws.take(1, torch.device("cpu")).fill_(123.0)  # scribble over the shared buffer
    ws.take(4 * 10**6, torch.device("cpu")).fill_(7.0)
    for copy, top, ref in results:
        assert same_bits(top, ref) and same_bits(copy, ref)


def test_rejects_mismatched_factors():
    with pytest.raises(ValueError):
        abs_stats(torch.ones(4, 3), torch.ones(2, 5), 3)
    with pytest.raises(ValueError):
        abs_stats(torch.ones(4, 3, 1), torch.ones(3, 5), 3)


def test_l1_accuracy_wide_rows():
    """L1 within 1e-6 of the exact sum for long rows and huge dynamic range, and of the sum in the order the
    engine had before this kernel (float32 rows, float64 across rows)."""

    g = torch.Generator().manual_seed(4)
    for m, n in [(40, 200000), (3000, 3000), (200000, 40)]:
        up = torch.randn(m, 4, generator=g) * torch.exp(3 * torch.randn(m, 1, generator=g))
        down = torch.randn(4, n, generator=g)
        l1, _ = abs_stats(up, down, 10)
        exact = l1_reference(up, down)
        assert abs(l1 - exact) <= 1e-6 * exact
        rows_then_total = float((up @ down).abs_().sum(1).sum(dtype=torch.float64))
        assert abs(l1 - rows_then_total) <= 1e-6 * exact


def test_selection_levels_are_used():
    """The big-layer path really walks two tables (so the tests above cover the walk)."""
    seen = []
    original = T._select

    def spy(levels, real, k):
        out = original(levels, real, k)
        seen.append(len(levels))
        return out

    T._select = spy
    try:
        up, down = factors(1280, 1280, 8, 0)
        check(up, down, 1024)
        up, down = factors(640, 640, 8, 0)
        check(up, down, 1024)
    finally:
        T._select = original
    assert seen == [3, 2]
