"""Not a mirror of a webui file: how a host overlay's module builds on the same module of the layer below.

The doubles are layers put on ``sys.path`` top first: ``[tests/doubles/forge, tests/doubles/a1111]``. Their
package folders (``modules``, ``backend``, ``modules_forge``) have no ``__init__.py``, so Python merges each
package across the layers and the first layer that has a module file wins: ``import modules.processing``
takes the overlay's file, ``import modules.errors`` the A1111 double's. An overlay module that differs from
the layer below in part only starts with ``extend(globals())``: the layer below's file runs in the overlay
module's own namespace (one module object, one set of globals, so a function of the lower layer that calls
another one finds the overlay's version), and what follows replaces what the host changes::

    a1111 = extend(globals())     # the names the layer below defined, e.g. a1111.CFGDenoiser
    FORGE = True                  # a switch the lower layer's code reads at call time

A module of a higher layer (a Forge Neo overlay above Forge's) chains the same way: its ``extend`` runs
Forge's file, whose own ``extend`` runs A1111's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _search_path(module_name: str) -> list[str]:
    package = module_name.rpartition(".")[0]
    return list(sys.modules[package].__path__) if package else list(sys.path)


def extend(module_globals: dict[str, Any]) -> SimpleNamespace:
    """Run the next layer's file of the module whose globals these are into them; return what it defined."""
    name = module_globals["__name__"]
    here = Path(module_globals["__file__"]).resolve()
    leaf = name.rpartition(".")[2]
    folders = [Path(p).resolve() for p in _search_path(name) if p]
    if here.parent not in folders:
        raise ImportError(f"{here} is not on the search path of {name}")
    for folder in folders[folders.index(here.parent) + 1:]:
        base = folder / f"{leaf}.py"
        if not base.is_file():
            continue
        own = {key: module_globals[key] for key in ("__file__", "__doc__")}
        module_globals["__file__"] = str(base)
        try:
            exec(compile(base.read_text(), str(base), "exec", dont_inherit=True), module_globals)
        finally:
            module_globals.update(own)
        return SimpleNamespace(**{k: v for k, v in module_globals.items() if not k.startswith("__")})
    raise ImportError(f"no layer below {here.parent} has {name}")
