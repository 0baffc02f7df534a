"""Host-neutral webui glue: the argument model, the <klora> tag, infotext, API args, XYZ axes, the panel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class KLoraArgs:
    """Everything the panel, the tag and the API can set. ``alpha``/``beta`` None = the pattern's default."""

    enabled: bool = False
    content: str = ""
    style: str = ""
    content_strength: float = 1.0
    style_strength: float = 1.0
    pattern: Literal["s", "s*"] = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: Literal["auto", "paper", "manual"] = "auto"
    gamma_value: float = 1.0
    mode: Literal["klora", "topk", "fixed", "random", "merge"] = "klora"
    scope: Literal["all", "attention"] = "all"
    te: Literal["both", "content", "style", "none"] = "both"
    show_map: bool = False
