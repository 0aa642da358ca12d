"""Replace a Megatron function everywhere it is bound, not only where it is defined.

Megatron binds some functions by name at import (megatron-core 0.16.1's ``megatron/training/initialize.py`` does
``from megatron.training.arguments import parse_args, validate_args``; ``megatron/training/training.py`` imports
``get_megatron_optimizer``). Setting the attribute on the defining module alone never reaches those copies, so a
wrapper installed after they were imported would be silently bypassed. :func:`rebind` sets it on the defining
module (later ``from ... import`` picks it up) and on every loaded module that holds the original object.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


def rebind(module: ModuleType, name: str, wrapper: Callable[..., Any]) -> list[str]:
    """Install ``wrapper`` as ``module.name`` and in every loaded module bound to the original; returns the modules
    changed (defining module first). The wrapper keeps the original as ``__wrapped__``."""
    original = getattr(module, name)
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    changed = [module.__name__]
    setattr(module, name, wrapper)
    for other in list(sys.modules.values()):
        if other is None or other is module:
            continue
        try:
            if vars(other).get(name) is original:
                setattr(other, name, wrapper)
                changed.append(other.__name__)
        except TypeError:  # modules without a __dict__
            continue
    return changed
