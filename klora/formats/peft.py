"""Alpha of PEFT files, from diffusers' ``lora_adapter_metadata`` header entry (PEFT ``LoraConfig.to_dict``,
its keys optionally prefixed by the component: ``transformer.lora_alpha``, ``text_encoder.alpha_pattern``).

PEFT scales a layer by ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), ``alpha_pattern`` overriding
``lora_alpha`` for modules whose dotted name ends in a match of the pattern at a '.' boundary. The alpha
returned is folded so that ``alpha / rank`` is PEFT's scale. Bad metadata is refused, never ignored: a wrong
alpha would silently weigh the LoRA wrong.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from klora.layers import LoraFormatError


class PeftConfig:
    """The ``lora_adapter_metadata`` of one file ({} when it has none)."""

    def __init__(self, metadata: dict[str, str], path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            try:
                data = json.loads(raw)
            except json.JSONDecodeError:
                raise LoraFormatError(path, "the lora_adapter_metadata entry is not valid JSON") from None
            if isinstance(data, dict):
                self.data = data

    def _get(self, prefix: str, name: str) -> Any:
        if prefix and f"{prefix}.{name}" in self.data:
            return self.data[f"{prefix}.{name}"]
        return self.data.get(name)

    def alpha(self, prefix: str, module: str, rank: int) -> float | None:
        """Alpha of ``module`` (dotted path below ``prefix``, e.g. ``transformer``), or None without one."""
        if not self.data:
            return None
        alpha = self._get(prefix, "lora_alpha")
        pattern = self._get(prefix, "alpha_pattern") or {}
        if isinstance(pattern, dict):
            for pat, value in pattern.items():
                try:
                    hit = re.match(rf"(.*\.)?(?:{pat})$", module)
                except re.error as e:
                    raise LoraFormatError(self.path, f"lora_adapter_metadata: alpha_pattern {pat!r} is not "
                                                     f"a valid pattern ({e})") from None
                if hit:
                    alpha = value
                    break
        if alpha is None:
            return None
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            alpha = math.nan
        if not math.isfinite(alpha):
            raise LoraFormatError(self.path, f"lora_adapter_metadata: the LoRA alpha of {module} is not a "
                                             f"finite number")
        if self._get(prefix, "use_rslora"):
            alpha *= math.sqrt(rank)
        return alpha
