"""Per-layer L1 and Top-K of |U| for LoRA pairs: naive, current ``klora.fusion`` and ``klora.topk``.

Pairs (SDXL UNet, the 560 attention projections, shapes from :func:`sdxl_attention_shapes`; random
kohya-like factors, as ``bench_scoring.py`` makes them):

* ``r32 x r32``: both LoRAs rank 32, K = 1024 per layer (the issue's pair);
* ``r8 x r32``: ranks 8 and 32, K = 256 (``bench_scoring.py``'s pair).

For each layer and file: ``U = up @ down`` (float32), L1 = Σ|U| and the K largest |U|.

In process (CPU seconds of this process, ``time.process_time``, median of ``--reps``):

* naive: ``a = (up @ down).abs_()``, ``torch.topk(a.flatten(), K).values``, ``a.sum(dtype=float64)``;
* current: ``klora.fusion._layer_stats`` (dense product, ``abs_``, row sums, chunk-maxima Top-K);
* ours: ``klora.topk.abs_stats`` with one ``Workspace`` per file;
* products only: ``up @ down`` per layer (what every exact method must at least do).

Every method's Top-K values are compared with the naive ones (``torch.equal`` per layer) and every L1
with a float64 reference.

Whole process (``--process``, on by default; the pair written to a temporary folder with safetensors;
user + sys CPU seconds of each child from ``resource.getrusage``, median of ``--process-reps``):

* ``import torch``: the interpreter and torch alone;
* floor: import torch, read both files (``safetensors.torch.load_file``), form every product;
* naive: the floor plus the naive L1 and Top-K per layer;
* ours: import torch and ``klora.topk``, read both files (``safe_open``) and hash them with sha256 (what a
  disk cache keys on), ``abs_stats`` per layer; also without the hashing;
* current CLI: ``python -m klora inspect CONTENT STYLE`` (reads with ``klora.formats``, scores, prints).

Children run with ``OMP_NUM_THREADS=1`` (and set ``torch.set_num_threads(1)``) unless ``--threads``.

``--pruning`` also reports how much a Cauchy–Schwarz bound ``|U_ij| ≤ ‖up_i‖·‖down_j‖`` could prune.

    python benchmarks/bench_topk.py [--reps 3] [--process-reps 3] [--no-process] [--pairs r32,r8] [--pruning]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from klora import fusion
from klora.formats import LoraLayer
from klora.topk import Workspace, abs_stats

Shapes = dict[str, tuple[int, int]]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def sdxl_attention_shapes() -> Shapes:
    """The 560 attention projections of the SDXL base UNet: diffusers module name (dots as ``_``) → (out, in).

    Transformer blocks: ``down_blocks.1`` (640 channels, 2 attentions × 2 blocks), ``down_blocks.2`` (1280,
    2 × 10), ``mid_block`` (1280, 1 × 10), ``up_blocks.0`` (1280, 3 × 10), ``up_blocks.1`` (640, 3 × 2);
    each block has ``attn1`` (self) and ``attn2`` (cross, context 2048) with ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``. Checked equal (keys, order and shapes) to the Linear layers of diffusers'
    ``UNet2DConditionModel`` built from the SDXL config on the meta device (``--check-shapes``).
    """
    shapes: Shapes = {}
    for prefix, channels, attentions, depth in (
        ("down_blocks_1", 640, 2, 2), ("down_blocks_2", 1280, 2, 10), ("up_blocks_0", 1280, 3, 10),
        ("up_blocks_1", 640, 3, 2), ("mid_block", 1280, 1, 10),
    ):
        for a in range(attentions):
            for b in range(depth):
                for attn in ("attn1", "attn2"):
                    for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                        cross = attn == "attn2" and proj in ("to_k", "to_v")
                        key = f"{prefix}_attentions_{a}_transformer_blocks_{b}_{attn}_{proj}"
                        shapes[key] = (channels, 2048 if cross else channels)
    return shapes


def check_shapes() -> None:
    """Compare :func:`sdxl_attention_shapes` with diffusers' SDXL UNet (needs diffusers)."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    real = {name.replace(".", "_"): tuple(m.weight.shape) for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    ours = sdxl_attention_shapes()
    if set(real) != set(ours) or any(real[k] != ours[k] for k in ours):
        raise SystemExit("sdxl_attention_shapes() differs from diffusers' SDXL UNet")
    print(f"shape table checked against diffusers: {len(ours)} layers equal")


def make_factors(shapes: Shapes, rank: int, seed: int) -> Factors:
    """kohya-like factors: down ~ N(0, 1/in), up ~ N(0, σ_l²) with σ_l varying per layer."""
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for key, (o, i) in shapes.items():
        sigma = 0.01 * float(torch.empty(1).uniform_(0.3, 3.0, generator=gen))
        up = torch.randn(o, rank, generator=gen) * sigma
        out[key] = (up, torch.randn(rank, i, generator=gen) / math.sqrt(i))
    return out


def write_lora(path: Path, factors: Factors, alpha: float) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key, (up, down) in factors.items():
        tensors[f"lora_unet_{key}.lora_down.weight"] = down.contiguous()
        tensors[f"lora_unet_{key}.lora_up.weight"] = up.contiguous()
        tensors[f"lora_unet_{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


# ------------------------------------------------------------------------------------------ in process


def naive(factors: Factors, k: int) -> list[tuple[float, torch.Tensor]]:
    out = []
    for up, down in factors.values():
        a = (up @ down).abs_()
        out.append((float(a.sum(dtype=torch.float64)), torch.topk(a.flatten(), min(k, a.numel())).values))
    return out


def current(factors: Factors, k: int) -> list[tuple[float, torch.Tensor]]:
    table: dict = {}
    out = []
    for key, (up, down) in factors.items():
        shape = (up.shape[0], down.shape[1])
        layer = LoraLayer(key, key, "lora", {"down": down, "up": up}, None, up.shape[1], shape)
        stats, _ = fusion._layer_stats(table, layer, k)
        out.append((stats.l1, stats.top[:k]))
    return out


def ours(factors: Factors, k: int) -> list[tuple[float, torch.Tensor]]:
    ws = Workspace()
    return [abs_stats(up, down, k, ws) for up, down in factors.values()]


def products(factors: Factors, k: int) -> list:
    for up, down in factors.values():
        up @ down
    return []


def median_cpu(fn, reps: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(reps):
        c0 = time.process_time()
        result = fn()
        times.append(time.process_time() - c0)
    return statistics.median(times), times, result


def in_process(pairs: dict[str, tuple[Factors, Factors]], reps: int) -> None:
    print(f"\nIn process: CPU seconds (median of {reps}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    methods = [("products only (up @ down)", products), ("naive (abs_, topk, float64 sum)", naive),
               ("current klora.fusion", current), ("ours klora.topk", ours)]
    for name, (fc, fs) in pairs.items():
        k = next(iter(fc.values()))[0].shape[1] * next(iter(fs.values()))[0].shape[1]
        print(f"  pair {name} (K = {k}, both files):")
        results = {}
        for label, fn in methods:
            both = []
            ts = []
            for _ in range(reps):  # interleave the two files inside each repetition
                c0 = time.process_time()
                both = [fn(fc, k), fn(fs, k)]
                ts.append(time.process_time() - c0)
            results[label] = (statistics.median(ts), ts, both)
        ref = results["naive (abs_, topk, float64 sum)"][2]
        l1_ref = [[float((up @ down).double().abs().sum()) for up, down in f.values()] for f in (fc, fs)]
        t_naive = results["naive (abs_, topk, float64 sum)"][0]
        for label, (t, ts, res) in results.items():
            note = ""
            if res and res[0]:
                pairs_ = [(a, b, l1) for side in range(2)
                          for a, b, l1 in zip(res[side], ref[side], l1_ref[side], strict=True)]
                same = all(torch.equal(a[1], b[1]) for a, b, _ in pairs_)
                rel = max(abs(a[0] - l1) / l1 for a, _, l1 in pairs_)
                note = f"top-K equal to naive: {same}; L1 max rel. error vs float64 {rel:.1e}"
                if not same:
                    raise SystemExit(f"{label}: Top-K differs from the naive method")
            print(f"    {label:<34} {t:7.3f} s  (naive / this {t_naive / t:5.2f}×)  "
                  f"[{', '.join(f'{x:.2f}' for x in ts)}]  {note}")


def pruning(pairs: dict[str, tuple[Factors, Factors]]) -> None:
    """How much a Cauchy–Schwarz bound could prune: the share of rows / 16-row column chunks whose bound
    ``(1 + 1e-5)·max_i ‖up_i‖·‖down_j‖`` lies below the exact K-th largest |U| (the best case: the exact
    K-th value known in advance). Only the maxima pass of such chunks could be skipped (the L1 needs every
    entry); the product, abs_ and the row sums stay."""
    print("\nBound-based pruning (Cauchy–Schwarz), best case with the exact K-th value:")
    for name, (fc, fs) in pairs.items():
        k = next(iter(fc.values()))[0].shape[1] * next(iter(fs.values()))[0].shape[1]
        for side, f in (("content", fc), ("style", fs)):
            rows = chunks = total_rows = total_chunks = 0
            for up, down in f.values():
                u = (up @ down).abs_()
                t = float(torch.topk(u.flatten(), min(k, u.numel())).values[-1])
                un, dn = up.double().norm(dim=1), down.double().norm(dim=0)
                rows += int((un * dn.max() * (1 + 1e-5) < t).sum())
                m = un.shape[0] // 16 * 16
                chunk_bound = un[:m].view(-1, 16).amax(1)[:, None] * dn[None, :] * (1 + 1e-5)
                chunks += int((chunk_bound < t).sum())
                total_rows, total_chunks = total_rows + un.shape[0], total_chunks + chunk_bound.numel()
            print(f"  pair {name}, {side} (rank {next(iter(f.values()))[0].shape[1]}, K = {k}): "
                  f"{rows / total_rows:.1%} of rows, {chunks / total_chunks:.1%} of 16-row chunks prunable")


# ------------------------------------------------------------------------------------------ whole process

_PRELUDE = """
import os, sys, torch
threads = int(os.environ.get("BENCH_THREADS", "1"))
if threads:
    torch.set_num_threads(threads)
"""

_LOAD = """
from safetensors.torch import load_file
def pairs(path):
    t = load_file(path)
    for key in t:
        if key.endswith(".lora_down.weight"):
            yield t[key.replace("lora_down", "lora_up")].float(), t[key].float()
def rank(path):
    return next(d.shape[0] for _, d in pairs(path))
paths = sys.argv[1:3]
K = rank(paths[0]) * rank(paths[1])
"""

CHILDREN: dict[str, str] = {
    "import torch": _PRELUDE,
    "floor: import, read, products": _PRELUDE + _LOAD + """
for p in paths:
    for up, down in pairs(p):
        up @ down
""",
    "naive": _PRELUDE + _LOAD + """
for p in paths:
    for up, down in pairs(p):
        a = (up @ down).abs_()
        torch.topk(a.flatten(), min(K, a.numel())).values, float(a.sum(dtype=torch.float64))
""",
    "ours (+ sha256 of both files)": _PRELUDE + """
import hashlib, mmap
from safetensors import safe_open
from klora.topk import Workspace, abs_stats
paths = sys.argv[1:3]
def sha256(path):
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return hashlib.sha256(m).hexdigest()
def pairs(path):
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        for key in keys:
            if key.endswith(".lora_down.weight"):
                yield f.get_tensor(key.replace("lora_down", "lora_up")), f.get_tensor(key)
digests = [sha256(p) for p in paths] if os.environ.get("BENCH_HASH", "1") == "1" else []
ranks = [next(d.shape[0] for _, d in pairs(p)) for p in paths]
K = ranks[0] * ranks[1]
for p in paths:
    ws = Workspace()
    stats = [abs_stats(up, down, K, ws) for up, down in pairs(p)]
""",
}


def run_child(code: str | None, args: list[str], env: dict[str, str], cwd: Path) -> float:
    """User + sys CPU seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, *(["-m", "klora", "inspect"] if code is None else ["-c", code]), *args]
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def whole_process(pairs: dict[str, tuple[Factors, Factors]], reps: int, threads: int) -> None:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               BENCH_THREADS=str(threads))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"\nWhole process: user + sys CPU seconds per child (median of {reps}; runs interleaved), "
          f"{threads or 'default'} thread(s)")
    with tempfile.TemporaryDirectory(prefix="bench_topk_") as tmp:
        for name, (fc, fs) in pairs.items():
            paths = [Path(tmp) / f"{name}_content.safetensors", Path(tmp) / f"{name}_style.safetensors"]
            write_lora(paths[0], fc, alpha=16.0)
            write_lora(paths[1], fs, alpha=16.0)
            size = sum(p.stat().st_size for p in paths) / 2**20
            runs: dict[str, tuple[str | None, dict[str, str]]] = {
                label: (code, env) for label, code in CHILDREN.items()}
            runs["ours (no hashing)"] = (CHILDREN["ours (+ sha256 of both files)"], dict(env, BENCH_HASH="0"))
            runs["current: python -m klora inspect"] = (None, env)
            times: dict[str, list[float]] = {label: [] for label in runs}
            for _ in range(reps):
                for label, (code, e) in runs.items():
                    times[label].append(run_child(code, [str(p) for p in paths], e, root))
            med = {label: statistics.median(ts) for label, ts in times.items()}
            floor = med["floor: import, read, products"]
            print(f"  pair {name} ({size:.0f} MiB of files):")
            for label, ts in times.items():
                runs_text = ", ".join(f"{x:.2f}" for x in ts)
                print(f"    {label:<34} {med[label]:7.2f} s  ({med[label] / floor:4.2f}× floor, "
                      f"naive / this {med['naive'] / med[label]:5.2f}×)  [{runs_text}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="in-process repetitions (median shown)")
    ap.add_argument("--process-reps", type=int, default=3, help="whole-process repetitions (median shown)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--no-process", action="store_true", help="skip the whole-process comparison")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process comparison")
    ap.add_argument("--pairs", default="r32,r8", help="comma-separated: r32 (r32 x r32), r8 (r8 x r32)")
    ap.add_argument("--check-shapes", action="store_true", help="check the shape table against diffusers")
    ap.add_argument("--pruning", action="store_true", help="measure what a Cauchy–Schwarz bound could prune")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_shapes:
        check_shapes()
    shapes = sdxl_attention_shapes()
    numel = sum(o * i for o, i in shapes.values())
    print(f"SDXL attention projections: {len(shapes)} layers, {numel / 1e6:.0f} M product entries per file")
    style = make_factors(shapes, 32, seed=2)
    pairs: dict[str, tuple[Factors, Factors]] = {}
    for name in args.pairs.split(","):
        if name == "r32":
            pairs["r32 x r32"] = (make_factors(shapes, 32, seed=1), style)
        elif name == "r8":
            pairs["r8 x r32"] = (make_factors(shapes, 8, seed=1), style)
        else:
            raise SystemExit(f"unknown pair {name!r}")
    if args.pruning:
        pruning(pairs)
    if not args.no_in_process:
        in_process(pairs, args.reps)
    if not args.no_process:
        whole_process(pairs, args.process_reps, args.threads)


if __name__ == "__main__":
    main()
