"""What a webui host supplies to the generation lifecycle (:mod:`klora.webui.session`), which is written once.

A host answers four questions about the model the webui has loaded: which family it is (``sd1``, ``sdxl``,
``flux`` …; per-family option defaults come from :data:`klora.options.FAMILY_DEFAULTS`), whether K-LoRA can
run on it, where each canonical layer key lives in it (:class:`klora.apply.Target`), and what to do at the
start of each sampling pass (e.g. tell the host's memory manager what the hooks will hold). Two more answer
what happens when a second checkpoint takes over mid-generation (a refiner, Wan 2.2's low-noise expert): which
checkpoint's weights the model holds now, and which LoRA pair K-LoRA continues with there, if any;
:class:`HostDefaults` gives the answers of hosts whose refiner ends K-LoRA. Names → files, the step clock, the
tag, infotext, XYZ, API and panel are the same on every host and live beside this.

Adding a host: a module in this package with a class that implements :class:`Host`, and a line in
:func:`klora.webui.hosts.load`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from klora.apply import Target

if TYPE_CHECKING:
    from klora.webui.session import Setup


class Host(Protocol):
    name: str
    """``a1111``, ``forge`` …"""

    label: str
    """For messages: the host's name and version."""

    def family(self, model: Any) -> str:
        """The model family of ``model`` (``sd1``, ``sd2``, ``sdxl``, ``flux``, ``chroma`` …, or the class
        name of a model K-LoRA does not know)."""

    def refusal(self, model: Any) -> str | None:
        """Why K-LoRA cannot run on ``model`` (shown to the user), or None."""

    def targets(self, model: Any, keys: Iterable[str]) -> dict[str, Target]:
        """Canonical key → where its delta goes in ``model``, for the keys it can place."""

    def before_sampling(self, p: Any, setup: Setup) -> None:
        """At the start of a sampling pass with K-LoRA on (``process_before_every_sampling``), and when K-LoRA
        continues on a second expert mid-pass (:meth:`expert_pair`)."""

    def loaded_checkpoint(self, p: Any, model: Any) -> Any:
        """The checkpoint whose weights ``model`` holds now (compared with the one a setup was made for; a
        host that loads a refiner's weights into the same modules says so here)."""

    def expert_pair(self, p: Any, model: Any, content: str, style: str) -> tuple[str, str] | None:
        """When ``model`` holds another checkpoint than the generation started with
        (:meth:`loaded_checkpoint`): the content and style LoRA names K-LoRA continues with on it, τ running
        on; None: K-LoRA stops there (an SDXL refiner, which the LoRAs were not made for)."""


class HostDefaults:
    """The answers of a host on which a refiner ends K-LoRA (A1111, Forge)."""

    def loaded_checkpoint(self, p: Any, model: Any) -> Any:
        return getattr(model, "sd_checkpoint_info", None)

    def expert_pair(self, p: Any, model: Any, content: str, style: str) -> tuple[str, str] | None:
        return None


def flag_family(model: Any) -> str | None:
    """The SD family by the ``is_sdxl``/``is_sd3``/``is_sd2``/``is_sd1`` flags A1111's and Forge's models
    carry, or None when none is set."""
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd3", "sd3"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(model, flag, False):
            return family
    return None
