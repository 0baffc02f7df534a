"""Per-call cost of K-LoRA's forward hooks on an SD1.5-sized UNet, against merged weights.

An SD1.5-sized diffusers UNet (the real SD1.5 config, random weights, fp32, CPU) at a 64×64 latent,
with rank-32 content and style LoRAs (synthetic, written to a temporary directory and read back) on
every attention projection. The same UNet is timed, alternately, with the deltas chosen at one step
merged into its weights (what a host that re-patches weights pays per call: nothing extra) and with the
weights restored and our hooks attached for that step instead. Median of several calls after a warm-up.

    python benchmarks/bench_hooks.py [--reps 4] [--batch 1] [--rank 32] [--threads N]

On a machine shared with other work, ``--threads 1`` gives steadier figures (several threads spin-wait
on each other when cores are busy), and the ``cpu`` column (process CPU time) leaves out the time spent
waiting for other processes. The last line brackets the hooks with timing hooks inside one call, which
other processes' load affects much less than the call-to-call comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from klora.apply import StepClock, Target, attached
from klora.delta import dense_delta
from klora.formats import read_lora
from klora.fusion import make_plan
from klora.keys.sd import module_targets
from klora.options import FusionOptions

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def write_lora(unet: torch.nn.Module, path: Path, rank: int, seed: int) -> int:
    """A kohya-style rank-``rank`` LoRA on every attention projection; returns the layer count."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not name.endswith(PROJECTIONS):
            continue
        out, inp = module.weight.shape
        std = 0.01 * float(torch.empty(1).uniform_(0.5, 2.0, generator=gen))
        prefix = "lora_unet_" + name.replace(".", "_")
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * std
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * std
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(tensors) // 3


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time leaves out waiting for other processes)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4, help="timed calls per variant (after one warm-up each)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="run length; the timed step is the middle one")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from diffusers import UNet2DConditionModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        n_layers = write_lora(unet, Path(tmp) / "content.safetensors", args.rank, 1)
        write_lora(unet, Path(tmp) / "style.safetensors", args.rank, 2)
        content = read_lora(Path(tmp) / "content.safetensors")
        style = read_lora(Path(tmp) / "style.safetensors")
    plan = make_plan(content, style, FusionOptions())
    modules = module_targets(unet, "unet", "diffusers")
    targets = {k: Target(modules[k]) for k in plan.layers}
    clock = StepClock()
    clock.set_step(args.steps // 2, args.steps)
    chosen = {k: plan.choose(k, clock.tau) for k in plan.layers}

    gen = torch.Generator().manual_seed(3)
    inputs = {
        "sample": torch.randn(args.batch, 4, 64, 64, generator=gen),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(args.batch, 77, 768, generator=gen),
    }
    originals = {k: modules[k].weight.detach().clone() for k in plan.layers}
    deltas = {k: dense_delta((content if c == "content" else style).layers[k],
                             plan.options.content_strength if c == "content" else plan.options.style_strength)
              for k, c in chosen.items()}

    def merge() -> None:
        for k, d in deltas.items():
            modules[k].weight.add_(d)

    def restore() -> None:
        for k, w in originals.items():
            modules[k].weight.copy_(w)

    def call() -> torch.Tensor:
        return unet(**inputs).sample

    merged_t: list[tuple[float, float]] = []
    hooked_t: list[tuple[float, float]] = []

    def run_merged() -> None:
        merge()
        merged_t.append(timed(call))
        restore()

    def run_hooked() -> None:
        with attached(plan, content, style, targets, clock):
            hooked_t.append(timed(call))

    with torch.inference_mode():
        merge()
        y_merged = call()  # warm-up
        restore()
        with attached(plan, content, style, targets, clock):
            y_hooked = call()  # warm-up
        err = float((y_merged - y_hooked).abs().max())
        # Pairs, alternating which goes first, so that load from other processes and drift hit both alike.
        for i in range(args.reps):
            first, second = (run_merged, run_hooked) if i % 2 == 0 else (run_hooked, run_merged)
            first()
            second()

        # The hooks' own work inside one call, bracketed by two public timing hooks per module: one
        # registered before ours (runs right after the module's forward), one after (runs right after ours).
        # Immune to other processes' load in a way the call-to-call comparison above is not.
        spent = [0.0]
        marks: dict[torch.nn.Module, float] = {}
        timing = [t.module.register_forward_hook(lambda m, a, o: marks.__setitem__(m, time.perf_counter()))
                  for t in targets.values()]

        def bracket_end(m: torch.nn.Module, a: object, o: object) -> None:
            spent[0] += time.perf_counter() - marks[m]

        with attached(plan, content, style, targets, clock):
            timing += [t.module.register_forward_hook(bracket_end) for t in targets.values()]
            t0 = time.perf_counter()
            call()
            bracketed_call = time.perf_counter() - t0
        for handle in timing:
            handle.remove()

    n_content = sum(c == "content" for c in chosen.values())
    print(f"SD1.5-sized UNet (random init, fp32, CPU, {torch.get_num_threads()} threads), "
          f"built in {build_s:.1f} s; latent {args.batch}x4x64x64, text 77x768")
    print(f"LoRAs: rank {args.rank} on {n_layers} attention projections each; "
          f"step {args.steps // 2}/{args.steps} (tau {clock.tau:.2f}): "
          f"{n_content} layers content, {len(chosen) - n_content} style")
    print(f"max |merged - hooked| output difference: {err:.2e}")
    print(f"{'variant':<28}{'wall median':>12}{'wall min':>10}{'wall max':>10}{'cpu median':>12}   calls")
    for name, ts in (("deltas merged into weights", merged_t), ("K-LoRA forward hooks", hooked_t)):
        wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
        print(f"{name:<28}{statistics.median(wall):>12.3f}{min(wall):>10.3f}{max(wall):>10.3f}"
              f"{statistics.median(cpu):>12.3f}   {len(ts)}")

    def pct(r: float) -> str:
        return f"{100 * (r - 1):+.1f}%"

    mw, hw = [t[0] for t in merged_t], [t[0] for t in hooked_t]
    mc, hc = [t[1] for t in merged_t], [t[1] for t in hooked_t]
    paired = statistics.median(h / m for m, h in zip(mw, hw, strict=True))
    print("hook overhead per UNet call (hooks vs merged): "
          f"wall median {pct(statistics.median(hw) / statistics.median(mw))}, "
          f"wall best-of {pct(min(hw) / min(mw))}, paired wall {pct(paired)}, "
          f"cpu median {pct(statistics.median(hc) / statistics.median(mc))}  [goal: < +10%]")
    print(f"time spent inside the hooks during one hooked call: {spent[0]:.3f} s of {bracketed_call:.3f} s "
          f"({100 * spent[0] / bracketed_call:.1f}% of that call)")


if __name__ == "__main__":
    main()
