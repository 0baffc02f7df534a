"""Exact L1 and Top-K of |U| for one layer: ``Σ|U|`` and the ``k`` largest ``|U|`` (descending).

``U`` is a layer's unscaled product: ``up @ down`` for plain LoRA (:func:`abs_stats`), any dense 2-D
tensor for the other kinds (:func:`dense_abs_stats`). Both return ``(l1, top)`` with ``top`` a new float32
tensor on the input's device, equal element for element (bit for bit) to the naive

    torch.topk((up.float() @ down.float()).abs().flatten(), min(k, numel)).values

on the same device, for every shape and ``k`` (``k ≥ numel`` gives all entries, sorted).

Method (per layer, one product, then a few passes over it):

1. ``U`` is formed by one ``torch.mm(up, down, out=X)`` call: the same call, shapes, strides and
   alignment as the naive ``up @ down`` (``X`` starts a buffer, as a fresh allocation does), so ``X``
   holds the naive product bit for bit. It is never formed in row blocks (a BLAS may round a block of
   rows differently from the whole product, e.g. through its matrix-vector path for one row).
2. ``X`` is then swept in row blocks that fit the CPU's L2 cache (one block on other devices), most
   recently written rows first: ``abs_`` in place, float32 row sums (for L1), and the maxima of
   16-row column chunks (table ``M1``, ``M1[g, c] = max X[16g:16g+16, c]``). Rows past the product
   (padding up to a multiple of 16) hold -1.
3. Coarser tables ``M2, M3, …`` fold 16 rows of the previous one, while it keeps at least
   ``_TOP_FACTOR · k`` real chunks. All selection works on the int32 bit patterns of the values: for
   non-negative IEEE floats the integer order is the float order and equal bits are equal values
   (``abs`` never leaves -0.0), the -1 padding is negative, NaN sorts above +inf as ``torch.topk`` does.

Selection and why it is exact. Let ``T`` be the coarsest table, ``P`` the ``k`` entries that
``topk(T, k)`` picks and ``t = min P`` (``T``'s ``k``-th largest entry). ``T``'s entries are maxima of
disjoint chunks of ``X``, so ``X`` has at least ``k`` entries ``≥ t``: ``t ≤ s``, the ``k``-th largest
entry of ``X``. Below the chunks of ``P``, level by level, the walk keeps exactly the children ``≥ t``; an
entry ``x ≥ t`` lies in one chunk per level and each has a maximum ``≥ x ≥ t``, so the walk ends with
``C`` = every entry ``≥ t`` of ``X`` below ``P``. Now (i) every entry ``x > t`` is in ``C``: its chunk of
``T`` has a maximum ``> t`` and ``topk`` picks every entry larger than its ``k``-th; (ii) ``|C| ≥ k``: the
maximum of each picked chunk is an entry ``≥ t`` below it. If ``s > t`` the Top-K entries are all ``> t``,
in ``C`` by (i). If ``s = t``, ``C`` holds every entry ``> s`` by (i) and at least ``k`` entries ``≥ s``
by (ii), so enough entries equal to ``s``. Either way the ``k`` largest values of ``C ⊆ X`` are those of
``X``, so ``topk(C, k).values`` equals ``topk(X, k).values`` element for element; no rounding is involved,
``C`` holds the very floats of ``X``.

L1: each row summed in float32 by ``torch.sum`` (on CPU a cascade of vectorized partial sums, on CUDA a
tree), the row sums accumulated in float64.
Bound: for ``n`` non-negative float32 terms every summation order has relative error at most
``γ(n-1)``, ``γ(j) = j·u/(1 - j·u)``, ``u = 2⁻²⁴`` (1.2e-4 for rows of 2048, the worst case of a plain
loop); the cascade keeps it near ``log2(n)·u`` in practice (≤ 1e-8 measured on SDXL layers against a
float64 sum, ≤ 1e-6 asserted by the tests); the float64 stage adds at most ``m·2⁻⁵³``. The L1 needs
every ``|U_ij|``, so an exact method must form every product entry; only the Top-K part could skip work
(bounds such as ``|U_ij| ≤ ‖up_i‖·‖down_j‖`` could skip only the maxima pass; on random rank-32 factors
they prune nothing, see ``benchmarks/bench_topk.py --pruning``); here it costs one pass and a short walk.

A NaN in ``U`` (an overflow of inf − inf) makes L1 NaN; the Top-K then comes from the naive ``topk``.
"""

from __future__ import annotations

import torch

__all__ = ["ENGINE_VERSION", "Workspace", "abs_stats", "dense_abs_stats"]

#: Changes whenever the returned numbers could change. A disk cache of results should key on it together
#: with what fixes the product's rounding: ``torch.__version__`` and the device type (CPU and CUDA
#: matmuls round differently, and "exact" means equal to the naive method on the same device).
ENGINE_VERSION = "klora.topk/1"

#: Rows per chunk and per fold.
FOLD = 16
#: At most this many entries: plain ``torch.topk`` (fewest ops).
_DIRECT = 1 << 15
#: The coarsest table keeps at least this many chunks per wanted value (a tight threshold ``t``).
_TOP_FACTOR = 4
#: CPU: bytes of ``X`` per block of the sweep (the block stays in a 2 MiB L2 between its three passes).
_BLOCK_BYTES = 1 << 20
#: Padding value: negative as float and as int32 bits, below every ``|U|``.
_PAD = -1.0


class Workspace:
    """A reusable float32 scratch buffer (one device at a time). Pass the same instance to consecutive
    calls to avoid allocating (and page-faulting) a fresh product buffer per layer; results never alias
    it. Not thread-safe: one workspace per thread."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.device != device or buf.numel() < numel:
            buf = self._buf = None  # free the old one first
            buf = self._buf = torch.empty(numel, dtype=torch.float32, device=device)
        return buf[:numel]


def abs_stats(up: torch.Tensor, down: torch.Tensor, k: int,
              workspace: Workspace | None = None) -> tuple[float, torch.Tensor]:
    """``(Σ|U|, top-k of |U| descending)`` for ``U = up @ down``; ``up`` (out, r), ``down`` (r, in).

    Factors of other float dtypes are converted to float32 first (as the naive product does)."""
    up, down = up.to(torch.float32), down.to(torch.float32)
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"abs_stats needs up (out, r) and down (r, in); got {tuple(up.shape)} and "
                         f"{tuple(down.shape)}")
    m, n = up.shape[0], down.shape[1]
    x, scratch = _buffers(workspace, m, n, up.device)
    torch.mm(up, down, out=x[:m])
    return _stats(x, m, k, True, scratch)


def dense_abs_stats(u: torch.Tensor, k: int,
                    workspace: Workspace | None = None) -> tuple[float, torch.Tensor]:
    """``(Σ|U|, top-k of |U| descending)`` for a dense ``U`` (2-D; more dims are flattened to
    ``(shape[0], -1)``, as ``reshape`` does). ``U`` itself is not modified."""
    u = u.to(torch.float32)
    u = u.reshape(u.shape[0], -1) if u.dim() > 1 else u.reshape(1, -1)
    m, n = u.shape
    x, scratch = _buffers(workspace, m, n, u.device)
    torch.abs(u, out=x[:m])
    return _stats(x, m, k, False, scratch)


# ------------------------------------------------------------------------------------------------ internals


def _buffers(workspace: Workspace | None, m: int, n: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The product buffer X, (m rounded up to a multiple of FOLD, n) at the start of the workspace, and
    float32 scratch after it for the chunk maxima and the row sums."""
    mp = -(-m // FOLD) * FOLD
    rest = (-(-(mp // FOLD) // FOLD) * FOLD) * n + m
    if workspace is None:
        return (torch.empty((mp, n), dtype=torch.float32, device=device),
                torch.empty(rest, dtype=torch.float32, device=device))
    buf = workspace.take(mp * n + rest, device)
    return buf[:mp * n].view(mp, n), buf[mp * n:]


def _stats(x: torch.Tensor, m: int, k: int, signed: bool,
           scratch: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``x``: (mp, n) buffer whose first ``m`` rows hold ``U`` (``|U|`` if not ``signed``); the rest is
    scratch, as is ``scratch`` (see :func:`_buffers`). Returns (L1, Top-K)."""
    mp, n = x.shape
    numel = m * n
    k = max(0, min(int(k), numel))
    u = x[:m]
    if numel <= _DIRECT or k in (0, numel) or m < 2 * FOLD:
        if signed:
            u.abs_()
        l1 = float(u.sum(1).sum(dtype=torch.float64)) if numel else 0.0
        if m < 2 * FOLD and numel > _DIRECT and k < numel:
            return l1, _short_top(u, k)
        return l1, torch.topk(u.reshape(-1), k).values

    if mp > m:
        x[m:].fill_(_PAD)
    xi = x.view(torch.int32)
    r1 = mp // FOLD
    r1p = -(-r1 // FOLD) * FOLD if r1 >= 2 * FOLD else r1  # room for the next fold
    m1 = scratch[:r1p * n].view(torch.int32).view(r1p, n)
    if r1p > r1:
        m1[r1:].fill_(-1)
    rowsum = scratch[r1p * n:r1p * n + m]
    rows = mp if x.device.type != "cpu" else max(FOLD, _BLOCK_BYTES // (4 * n) // FOLD * FOLD)
    for r0 in reversed(range(0, mp, rows)):  # the product's last rows are the ones still in cache
        r1_ = min(mp, r0 + rows)
        if r0 < m:
            block = u[r0:r1_]
            if signed:
                block.abs_()
            torch.sum(block, 1, out=rowsum[r0:min(m, r1_)])
        torch.amax(xi[r0:r1_].view(-1, FOLD, n), 1, out=m1[r0 // FOLD:r1_ // FOLD])
    l1 = float(rowsum.sum(dtype=torch.float64))
    if l1 != l1:  # NaN somewhere: leave the ordering of NaNs to topk itself
        return l1, torch.topk(u.reshape(-1), k).values
    if -(-m // FOLD) * n < k:  # fewer chunks than wanted values
        return l1, torch.topk(u.reshape(-1), k).values
    return l1, _select([xi, m1], [m, -(-m // FOLD)], k)


def _select(levels: list[torch.Tensor], real: list[int], k: int) -> torch.Tensor:
    """The ``k`` largest entries of ``levels[0]`` (int32 bits of non-negative floats), returned as
    float32. ``levels[i+1]`` folds 16 rows of ``levels[i]``; ``real[i]``: rows of level i that hold data
    (the rest is negative padding). See the module docstring for why the walk is exact."""
    n = levels[0].shape[1]
    while real[-1] >= 2 * FOLD and -(-real[-1] // FOLD) * n >= _TOP_FACTOR * k:
        a = levels[-1]
        rows = a.shape[0]
        if rows % FOLD:
            a = levels[-1] = torch.cat([a, a.new_full((FOLD - rows % FOLD, n), -1)])
        levels.append(torch.amax(a.view(-1, FOLD, n), 1))
        real.append(-(-real[-1] // FOLD))
    top = levels[-1]
    vals, idx = torch.topk(top.reshape(-1), k, sorted=False)
    t = vals.min()
    steps = torch.arange(0, FOLD * n, n, device=top.device).unsqueeze(1)
    for level in range(len(levels) - 2, -1, -1):
        # children of chunk (g, c): rows FOLD·g … FOLD·g + FOLD - 1 of column c one level down, listed
        # row by row (fewer cache misses than chunk by chunk)
        first = idx + (idx // n) * ((FOLD - 1) * n)
        flat = (first + steps).reshape(-1)
        vals = levels[level].reshape(-1).index_select(0, flat)
        keep = vals >= t
        if level:
            idx = flat[keep]
        else:
            vals = vals[keep]
    return torch.topk(vals, k).values.view(torch.float32)


def _short_top(u: torch.Tensor, k: int) -> torch.Tensor:
    """Top-K of a non-negative matrix with few rows and many columns: fold its transpose."""
    m, n = u.shape
    t, scratch = _buffers(None, n, m, u.device)
    t[:n].copy_(u.t())
    return _stats(t, n, k, False, scratch)[1]
