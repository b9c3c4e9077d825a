"""Exports imported on first use, for a package's ``__init__`` (PEP 562).

``__getattr__, __dir__ = lazy_exports(__name__, {"Name": "module", ...}, globals())``
makes ``package.Name`` import ``package.module`` the first time it is asked
for, so importing the package costs nothing and has no side effects.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Dict[str, str], namespace: Dict[str, Any]
                 ) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose names live in ``exports``' modules."""
    names = sorted(namespace.get("__all__", exports))

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def dir_() -> List[str]:
        return names
    return getattr_, dir_
