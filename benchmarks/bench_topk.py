"""Per-layer L1 and Top-K of |U| for SDXL LoRA pairs, and whole-process scoring: naive against ours.

Pairs (random kohya-like factors; shapes of the SDXL UNet from diffusers' config on the meta device;
float16 files, as trainers write them):

* ``r32 x r32``: the 560 attention projections, both LoRAs rank 32, K = 1024 per layer (93 MB files);
* ``r8 x r32``: the same layers, ranks 8 and 32, K = 256 (``bench_scoring.py``'s pair);
* ``all r32 x r64`` (``--pairs all``): every Linear and Conv2d of the UNet (attention, feed-forward,
  resnet convs, …: 794 layers), ranks 32 and 64, K = 2048.

For each layer and file: ``U = up @ down`` (float32; a conv's factors flattened), L1 = Σ|U| and the K
largest |U|.

In process (CPU seconds of this process, ``time.process_time``, median of ``--reps``):

* products only: ``up @ down`` per layer (what every exact method must at least do);
* naive: ``a = (up @ down).abs_()``, ``torch.topk(a.flatten(), K).values``, ``a.sum(dtype=float64)``;
* ours: ``klora.topk.abs_stats`` with one ``Workspace`` per file (what ``klora.scores`` calls).

Every method's Top-K values are compared with the naive ones (``torch.equal`` per layer) and every L1
with a float64 reference.

Whole process (the pair written to a temporary folder; user + sys CPU seconds and peak resident memory of
each child from ``os.wait4``, median of ``--process-reps``, runs interleaved):

* ``import torch``: the interpreter and torch alone;
* floor: import torch, read both files (``safetensors.torch.load_file``), form every product;
* naive: the floor plus the naive L1 and Top-K per layer;
* kernel: import torch, read both files, ``klora.topk.abs_stats`` per layer (no hashing, no key parsing);
* ``klora inspect --no-cache``: the command users run, cold (reads, hashes, maps keys, scores, prints);
* ``klora inspect``, warm: the same with its disk cache already written by an earlier run (the tables, and
  the files' sha256 by path, size and mtime: the files are read and their keys mapped, not hashed or scored).

Children run with ``OMP_NUM_THREADS=1`` (and ``torch.set_num_threads(1)``) unless ``--threads``.

``--pruning`` also reports how much a Cauchy–Schwarz bound ``|U_ij| ≤ ‖up_i‖·‖down_j‖`` could prune.

    python benchmarks/bench_topk.py [--reps 3] [--process-reps 3] [--no-process] [--pairs r32,r8,all]
                                    [--pruning]
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klora.topk import Workspace, abs_stats  # noqa: E402
from tests.synth import sdxl_unet_shapes, select, write_kohya  # noqa: E402

Factors = list[tuple[torch.Tensor, torch.Tensor]]  # (up, down) per layer, float32, flattened to 2-D
PAIRS = {  # name → (layers, content rank, style rank, file dtype)
    "r32": ("attention", 32, 32, torch.float16),
    "r8": ("attention", 8, 32, torch.float16),
    "all": ("all", 32, 64, torch.float16),
}


def pair_name(name: str) -> str:
    layers, rc, rs, _ = PAIRS[name]
    return f"{'all ' if layers == 'all' else ''}r{rc} x r{rs}"


def layer_magnitude(key: str) -> float:
    """kohya-like: the delta's size varies ten-fold from layer to layer (deterministic per key)."""
    return 0.01 * (0.3 + 2.7 * (zlib.crc32(key.encode()) % 1000) / 1000)


def write_pair(name: str, folder: Path) -> tuple[Path, Path]:
    layers, rc, rs, dtype = PAIRS[name]
    shapes = sdxl_unet_shapes()
    if layers == "attention":
        shapes = select(shapes, attention=True)
    paths = folder / f"{name}_content.safetensors", folder / f"{name}_style.safetensors"
    for path, rank, seed in ((paths[0], rc, 1), (paths[1], rs, 2)):
        write_kohya(path, shapes, rank=rank, alpha=rank / 2, seed=seed, scale_by=layer_magnitude, dtype=dtype)
        # dated an hour back, as a downloaded LoRA is: a file written seconds ago is hashed on every read
        then = time.time_ns() - 3600 * 10**9
        os.utime(path, ns=(then, then))
    return paths


def read_factors(path: Path) -> Factors:
    t = load_file(str(path))
    return [(t[key.replace("lora_down", "lora_up")].flatten(1).float(), t[key].flatten(1).float())
            for key in t if key.endswith(".lora_down.weight")]


# ------------------------------------------------------------------------------------------ in process


def naive(factors: Factors, k: int) -> list[tuple[float, torch.Tensor]]:
    out = []
    for up, down in factors:
        a = (up @ down).abs_()
        out.append((float(a.sum(dtype=torch.float64)), torch.topk(a.flatten(), min(k, a.numel())).values))
    return out


def ours(factors: Factors, k: int) -> list[tuple[float, torch.Tensor]]:
    ws = Workspace()
    return [abs_stats(up, down, k, ws) for up, down in factors]


def products(factors: Factors, k: int) -> list:
    for up, down in factors:
        up @ down
    return []


def in_process(pairs: dict[str, tuple[Factors, Factors]], reps: int) -> None:
    print(f"\nIn process: CPU seconds (median of {reps}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    methods = [("products only (up @ down)", products), ("naive (abs_, topk, float64 sum)", naive),
               ("ours (klora.topk.abs_stats)", ours)]
    for name, (fc, fs) in pairs.items():
        k = fc[0][0].shape[1] * fs[0][0].shape[1]
        print(f"  pair {name} (K = {k}, both files):")
        results = {}
        for label, fn in methods:
            both: list = []
            ts = []
            for _ in range(reps):
                c0 = time.process_time()
                both = [fn(fc, k), fn(fs, k)]
                ts.append(time.process_time() - c0)
            results[label] = (statistics.median(ts), ts, both)
        ref = results["naive (abs_, topk, float64 sum)"][2]
        l1_ref = [[float((up @ down).double().abs().sum()) for up, down in f] for f in (fc, fs)]
        t_naive = results["naive (abs_, topk, float64 sum)"][0]
        for label, (t, ts, res) in results.items():
            note = ""
            if res and res[0]:
                rows = [(a, b, l1) for side in range(2)
                        for a, b, l1 in zip(res[side], ref[side], l1_ref[side], strict=True)]
                same = all(torch.equal(a[1], b[1]) for a, b, _ in rows)
                rel = max(abs(a[0] - l1) / l1 for a, _, l1 in rows)
                note = f"top-K equal to naive: {same}; L1 max rel. error vs float64 {rel:.1e}"
                if not same:
                    raise SystemExit(f"{label}: Top-K differs from the naive method")
            print(f"    {label:<32} {t:7.3f} s  (naive / this {t_naive / t:5.2f}×)  "
                  f"[{', '.join(f'{x:.2f}' for x in ts)}]  {note}")


def pruning(pairs: dict[str, tuple[Factors, Factors]]) -> None:
    """How much a Cauchy–Schwarz bound could prune: the share of rows / 16-row column chunks whose bound
    ``(1 + 1e-5)·max_i ‖up_i‖·‖down_j‖`` lies below the exact K-th largest |U| (the best case: the exact
    K-th value known in advance). Only the maxima pass of such chunks could be skipped (the L1 needs every
    entry); the product, abs_ and the row sums stay."""
    print("\nBound-based pruning (Cauchy–Schwarz), best case with the exact K-th value:")
    for name, (fc, fs) in pairs.items():
        k = fc[0][0].shape[1] * fs[0][0].shape[1]
        for side, f in (("content", fc), ("style", fs)):
            rows = chunks = total_rows = total_chunks = 0
            for up, down in f:
                u = (up @ down).abs_()
                t = float(torch.topk(u.flatten(), min(k, u.numel())).values[-1])
                un, dn = up.double().norm(dim=1), down.double().norm(dim=0)
                rows += int((un * dn.max() * (1 + 1e-5) < t).sum())
                m = un.shape[0] // 16 * 16
                chunk_bound = un[:m].view(-1, 16).amax(1)[:, None] * dn[None, :] * (1 + 1e-5)
                chunks += int((chunk_bound < t).sum())
                total_rows, total_chunks = total_rows + un.shape[0], total_chunks + chunk_bound.numel()
            print(f"  pair {name}, {side} (rank {f[0][0].shape[1]}, K = {k}): "
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
            yield t[key.replace("lora_down", "lora_up")].flatten(1).float(), t[key].flatten(1).float()
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
    "kernel: import, read, klora.topk": _PRELUDE + _LOAD + """
from klora.topk import Workspace, abs_stats
for p in paths:
    ws = Workspace()
    stats = [abs_stats(up, down, K, ws) for up, down in pairs(p)]
""",
}
INSPECT = ["-m", "klora", "inspect", "--threads", "1"]
#: Runs a child's ``-c CODE`` or ``-m MODULE`` and writes its peak resident memory (``VmHWM``, this
#: process image only: ``ru_maxrss`` of a child would include the parent's size at the fork) to a pipe.
_PEAK = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    os.write(int(os.environ["BENCH_PEAK_FD"]), str(kib).encode())
atexit.register(peak)
flag, target, *rest = sys.argv[1:]
if flag == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<child>", "exec"), {"__name__": "__main__"})
"""


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """User + sys CPU seconds and peak resident MiB of one child process."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", _PEAK, *argv], env=dict(env, BENCH_PEAK_FD=str(write_end)),
                            cwd=ROOT, stdout=subprocess.DEVNULL, pass_fds=(write_end,))
    os.close(write_end)
    _, status, usage = os.wait4(proc.pid, 0)
    with os.fdopen(read_end, "rb") as f:
        peak_kib = int(f.read() or 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}): {argv[:3]}")
    return usage.ru_utime + usage.ru_stime, peak_kib / 1024


def whole_process(names: list[str], folder: Path, reps: int, threads: int) -> None:
    # children read bytecode as a user's Python does, even where PYTHONDONTWRITEBYTECODE keeps them from
    # writing it (then every run would compile the package again)
    compileall.compile_dir(ROOT / "klora", quiet=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               BENCH_THREADS=str(threads), KLORA_CACHE_DIR=str(folder / "cache"))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"\nWhole process: user + sys CPU seconds and peak RSS per child (median of {reps}; runs "
          f"interleaved), {threads or 'default'} thread(s)")
    for name in names:
        paths = [str(folder / f"{name}_{side}.safetensors") for side in ("content", "style")]
        size = sum(os.path.getsize(p) for p in paths) / 2**20
        runs = {label: ["-c", code, *paths] for label, code in CHILDREN.items()}
        runs["klora inspect --no-cache (cold)"] = [*INSPECT, "--no-cache", *paths]
        runs["klora inspect (warm disk cache)"] = [*INSPECT, *paths]
        run_child(runs["klora inspect (warm disk cache)"], env)  # writes the cache
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in runs}
        for _ in range(reps):
            for label, argv in runs.items():
                times[label].append(run_child(argv, env))
        med = {label: statistics.median(t for t, _ in ts) for label, ts in times.items()}
        rss = {label: max(m for _, m in ts) for label, ts in times.items()}
        base, floor = med["import torch"], med["floor: import, read, products"]
        print(f"  pair {pair_name(name)} ({size:.0f} MiB of files):")
        for label, ts in times.items():
            runs_text = ", ".join(f"{t:.2f}" for t, _ in ts)
            print(f"    {label:<34} {med[label]:7.2f} s  (+{med[label] - base:5.2f} over import torch; "
                  f"{med[label] / floor:4.2f}× floor; naive / this {med['naive'] / med[label]:5.2f}×)  "
                  f"peak {rss[label]:6.0f} MiB  [{runs_text}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="in-process repetitions (median shown)")
    ap.add_argument("--process-reps", type=int, default=3, help="whole-process repetitions (median shown)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--no-process", action="store_true", help="skip the whole-process comparison")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process comparison")
    ap.add_argument("--pairs", default="r32,r8", help=f"comma-separated, of {', '.join(PAIRS)}")
    ap.add_argument("--pruning", action="store_true", help="measure what a Cauchy–Schwarz bound could prune")
    args = ap.parse_args()
    names = args.pairs.split(",")
    if unknown := [n for n in names if n not in PAIRS]:
        raise SystemExit(f"unknown pair(s) {', '.join(unknown)}; known: {', '.join(PAIRS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_topk_") as tmp:
        folder = Path(tmp)
        for name in names:
            write_pair(name, folder)
        if args.pruning or not args.no_in_process:
            pairs = {pair_name(n): (read_factors(folder / f"{n}_content.safetensors"),
                                    read_factors(folder / f"{n}_style.safetensors")) for n in names}
            if args.pruning:
                pruning(pairs)
            if not args.no_in_process:
                in_process(pairs, args.reps)
            del pairs
        if not args.no_process:
            whole_process(names, folder, args.process_reps, args.threads)


if __name__ == "__main__":
    main()
