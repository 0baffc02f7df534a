"""The K-LoRA rule: γ, the time scale S(τ) and the comparison modes → a per-layer plan.

For a layer both LoRAs patch (scores from :mod:`klora.scores`: K, S_c, S_s, L1_c, L1_s of the effective
deltas):

* ``γ``: ``"auto"`` (the official code: mean of the per-layer ratios ``L1_c / L1_s``, ratios ≥ 3 × that
  mean dropped, mean of the rest), ``"paper"`` (eq. 9: ``Σ_l L1_c / Σ_l L1_s``) or a number;
* ``S(τ) = α·τ + β`` (pattern ``s``: 1.5, 0.5; pattern ``s*``: 1.5, 1.275 and ``S ← S mod α``,
  :data:`klora.options.PATTERNS`);
* content iff ``S_c > γ · S(τ) · S_s`` (strict), else style; ``balance`` b weights the style side once more,
  ``γ · 4^b · S(τ) · S_s`` (b = 0, the default, is the paper's rule exactly).

Nothing but S(τ) depends on time, so a plan is made once per pair and options; each step is then one
comparison per layer (:meth:`Plan.choose`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Literal

import torch

from klora.keys import is_text_encoder
from klora.layers import LoraFile
from klora.options import PATTERNS, FusionOptions
from klora.scores import PairScores, pair_scores

__all__ = ["Choice", "FusionOptions", "LayerPlan", "Plan", "make_plan"]

Choice = Literal["content", "style", "both", "none"]

LETTERS: dict[str, str] = {"content": "C", "style": "S", "both": "B", "none": "-"}

#: Probability of content per layer and step in mode ``random`` (the paper's ablation).
RANDOM_CONTENT_P = 1.0 / 3.0

#: γ "auto" drops per-layer ratios at or above this multiple of their mean (the official code).
GAMMA_OUTLIER_FACTOR = 3.0


# ------------------------------------------------------------------------------------------------- gamma


def _gamma(scores: PairScores, option: Literal["auto", "paper"] | float) -> tuple[float, str, str]:
    """(γ, method, note). Over the scored layers (shared, denoiser, in scope).

    ``auto``: ratios ``L1_c / L1_s`` of the layers whose style delta is not all zero (a zero style delta
    has no ratio); mean ``m``; ratios ≥ 3·m dropped; γ = mean of the rest. ``paper``: ``Σ L1_c / Σ L1_s``.
    When that leaves nothing to average or gives 0 or a non-finite value (no shared layer, all style deltas
    zero, all content deltas zero), γ = 1: with a zero content delta every such layer takes style under the
    strict rule whatever γ is, so nothing that matters changes.
    """
    if not isinstance(option, str):
        return float(option), "manual", "given"
    layers = list(scores.layers.values())
    if option == "paper":
        num, den = math.fsum(s.l1_content for s in layers), math.fsum(s.l1_style for s in layers)
        g = num / den if den > 0 else math.nan
        if not (math.isfinite(g) and g > 0):
            return 1.0, "paper", "fallback 1: no shared layer with non-zero deltas on both sides"
        return g, "paper", f"sum of L1 over {len(layers)} layers"
    ratios = [s.l1_content / s.l1_style for s in layers if s.l1_style > 0]
    if ratios:
        mean = math.fsum(ratios) / len(ratios)
        kept = [r for r in ratios if r < GAMMA_OUTLIER_FACTOR * mean]
        if kept:
            g = math.fsum(kept) / len(kept)
            if math.isfinite(g) and g > 0:
                return g, "auto", f"mean of {len(kept)} layer ratios, {len(ratios) - len(kept)} dropped"
    return 1.0, "auto", "fallback 1: no shared layer with non-zero deltas on both sides"


# -------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a plan.

    ``source``: ``shared`` (both files), ``content`` or ``style`` (only that file has it).
    ``constant``: the choice at every step for layers not decided per step (one file only, text encoders,
    layers outside the scope, mode ``merge``); None when ``Plan.choose`` decides per step.
    ``k``, ``score_*``, ``l1_*``: set for scored layers (shared, denoiser, in scope), else None.
    ``threshold``: mode ``klora``: θ = S_c / (γ·4^b·S_s), content while S(τ) < θ (±inf when S_s = 0: content
    at every step if S_c > 0, never if S_c = 0); mode ``topk``: S_c / S_s, content iff θ > 1; None otherwise.
    """

    key: str
    source: Literal["shared", "content", "style"]
    k: int | None = None
    score_content: float | None = None
    score_style: float | None = None
    threshold: float | None = None
    l1_content: float | None = None
    l1_style: float | None = None
    constant: Choice | None = None


def _theta(sc: float, ss: float, g: float) -> float:
    if ss > 0:
        return sc / (g * ss)
    return math.inf if sc > 0 else -math.inf


@dataclass(frozen=True)
class Plan:
    """Per-layer choices for any sampling progress τ ∈ [0, 1]."""

    options: FusionOptions
    gamma: float
    gamma_method: str
    gamma_note: str
    alpha: float
    beta: float
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def scale(self, tau: float) -> float:
        """S(τ) = α·τ + β (pattern ``s*``: modulo α)."""
        s = self.alpha * tau + self.beta
        if PATTERNS[self.options.pattern].modulo:
            s = s % self.alpha
        return s

    def choose(self, key: str, tau: float) -> Choice:
        """Which delta layer ``key`` applies at progress ``tau`` (``i / N`` at step ``i`` of ``N``).

        Mode ``klora`` evaluates the inequality itself (not the rounded θ), so ties behave as the rule.
        Mode ``random`` draws from (seed, key, τ): τ identifies the step (the same float for the same
        ``i / N``), so the two model calls of one step agree and ``choices`` shows what a run does.
        """
        lp = self.layers[key]
        if lp.constant is not None:
            return lp.constant
        mode = self.options.mode
        if mode == "klora":
            assert lp.score_content is not None and lp.score_style is not None
            style = self.gamma * self.options.style_factor * self.scale(tau) * lp.score_style
            return "content" if lp.score_content > style else "style"
        if mode == "topk":
            assert lp.score_content is not None and lp.score_style is not None
            return "content" if lp.score_content > lp.score_style else "style"
        if mode == "fixed":
            return "content" if self.scale(tau) <= 1.0 else "style"
        # random: a draw that depends only on (seed, key, τ); the two calls of one step (CFG) agree.
        return "content" if _uniform(self.options.seed, key, tau) < RANDOM_CONTENT_P else "style"

    def choices(self, key: str, steps: int) -> str:
        """One letter per step ``i = 0 … steps-1`` at τ = i/steps: C content, S style, B both, - none."""
        if steps < 1:
            raise ValueError("steps must be at least 1")
        return "".join(LETTERS[self.choose(key, i / steps)] for i in range(steps))

    def flips(self, key: str, steps: int) -> list[int]:
        """Steps ``i`` whose choice differs from step ``i - 1``."""
        row = self.choices(key, steps)
        return [i for i in range(1, steps) if row[i] != row[i - 1]]

    def content_share(self, steps: int) -> list[float | None]:
        """Per step: the share of content among the layers decided per step (None if there are none)."""
        keys = [k for k, lp in self.layers.items() if lp.constant is None]
        rows = [self.choices(k, steps) for k in keys]
        return [(sum(r[i] == "C" for r in rows) / len(rows)) if rows else None for i in range(steps)]

    @property
    def k_range(self) -> tuple[int, int] | None:
        """Smallest and largest K over the scored layers."""
        ks = [lp.k for lp in self.layers.values() if lp.k is not None]
        return (min(ks), max(ks)) if ks else None


def _uniform(seed: int, key: str, tau: float) -> float:
    """A uniform number in [0, 1) from (seed, key, τ), the same in every process."""
    # The seed's 64 low bits (the same bytes as "<q" for seeds in the signed range); + 0.0: -0.0 → 0.0
    data = struct.pack("<Qd", seed % 2**64, float(tau) + 0.0) + key.encode()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


_TE_ALLOWED: dict[str, frozenset[str]] = {
    "both": frozenset({"content", "style"}), "content": frozenset({"content"}),
    "style": frozenset({"style"}), "none": frozenset(),
}


def _te_choice(policy: str, has_content: bool, has_style: bool) -> Choice:
    allowed = _TE_ALLOWED[policy]
    c, s = has_content and "content" in allowed, has_style and "style" in allowed
    return "both" if c and s else "content" if c else "style" if s else "none"


def make_plan(content: LoraFile, style: LoraFile, options: FusionOptions | None = None,
              device: torch.device | str | None = None) -> Plan:
    """The plan for a content and a style LoRA.

    Layer order: the content file's layers, then those only the style file has. Denoiser layers one file
    has take that file's delta at every step. Text-encoder layers follow ``options.te`` at every step
    (a layer only one file has is applied if the policy allows that file, else ``none``). Shared denoiser
    layers outside ``options.scope`` take both deltas (as two ``<lora>`` tags would). In scope, mode
    decides: ``klora`` the rule, ``topk`` S_c > S_s, ``fixed`` content while S(τ) ≤ 1, ``random`` content
    with probability 1/3 per layer and step (seeded), ``merge`` both.
    """
    options = options or FusionOptions()
    scores = pair_scores(content, style, options.content_strength, options.style_strength, options.scope,
                         options.k, device)
    g, method, note = _gamma(scores, options.gamma)
    layers: dict[str, LayerPlan] = {}
    for key in list(content.layers) + [k for k in style.layers if k not in content.layers]:
        has_c, has_s = key in content.layers, key in style.layers
        source: Literal["shared", "content", "style"] = (
            "shared" if has_c and has_s else "content" if has_c else "style")
        if is_text_encoder(key):
            layers[key] = LayerPlan(key, source, constant=_te_choice(options.te, has_c, has_s))
        elif source != "shared":
            layers[key] = LayerPlan(key, source, constant=source)
        elif key not in scores.layers:
            layers[key] = LayerPlan(key, source, constant="both")
        else:
            s = scores.layers[key]
            weight = g * options.style_factor if options.mode == "klora" else 1.0
            scored = options.mode in ("klora", "topk")
            theta = _theta(s.score_content, s.score_style, weight) if scored else None
            layers[key] = LayerPlan(
                key, source, k=s.k, score_content=s.score_content, score_style=s.score_style,
                threshold=theta, l1_content=s.l1_content, l1_style=s.l1_style,
                constant="both" if options.mode == "merge" else None,
            )
    return Plan(options, g, method, note, options.resolved_alpha, options.resolved_beta, layers)
