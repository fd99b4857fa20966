"""Name → implementation registries: the project's extension points (docs/design.md).

One method = one file + one ``@REGISTRY.register("name")``: the class carries its algorithm and everything the tools
read from it (MACs schedule, budget mapping, reference position policy; see ``compactvl.schedules``). A registry imports its package lazily the first
time it is asked for a name, so registering never needs an import order.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} '{name}' is registered twice; pick another name")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin reloaded in a live session, or a test's toy method)."""
        self._items.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names()) or '(none)'}")
        return self._items[name]

    def canonical(self, name: str) -> str:
        """One name for whatever ``name`` registers (the first in sorting of all the names it is registered under),
        so that two configs naming one implementation differently compare equal."""
        obj = self.get(name)
        return min(n for n, o in self._items.items() if o is obj)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


ENCODERS: Registry = Registry("encoder", "compactvl.encoders")
TOKEN_OPS: Registry = Registry("token op", "compactvl.ops")
PROJECTORS: Registry = Registry("projector", "compactvl.projectors")
POLICIES: Registry = Registry("layer policy", "compactvl.policies")
EXPERTS: Registry = Registry("expert", "compactvl.experts")
