"""Package namespaces whose names are imported on first use (PEP 562), so importing a light
submodule (a command-line parser, a config) does not import torch through its package."""

from __future__ import annotations

from importlib import import_module

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, list[str]], namespace: dict):
    """exports: {module: [names]}. Returns (__getattr__, __dir__, __all__) for the package's
    namespace dict: a name is imported from its module on first access and cached there."""
    where = {name: module for module, names in exports.items() for name in names}
    names = sorted(where)

    def __getattr__(name):
        if name in where:
            value = getattr(import_module(where[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__, names
