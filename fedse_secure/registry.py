"""Named components (environments, aggregation rules, secure-aggregation backends, privacy mechanisms,
accountants), each kind in one :class:`Registry`.

A registry belongs to one package. Every module in that package is imported the first time a name is looked
up, and a module registers what it defines with the registry's decorator, so adding a component is one new
module in its package: no list to edit, no string switch, nothing else. Configs validate names against the
registry, and error messages list what is registered. Component modules must stay cheap to import (heavy
dependencies such as torch or minigrid are imported inside the functions that need them), because looking
up one name imports them all.

This is the shape of peft's ``register_peft_method`` and Opacus's accountant registry, with discovery by
package instead of an import list.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedse_secure.errors import FedseError

T = TypeVar("T")


class UnknownComponentError(FedseError, ValueError):
    """A name that no module of the registry's package registered."""


class Registry(Generic[T]):
    """``name -> component`` for one kind of component, filled by the modules of ``package``."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = False
        self._lock = threading.RLock()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class (or any object) defined in the package."""
        if not name or name != name.strip():
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty word")

        def add(component: T) -> T:
            with self._lock:
                existing = self._entries.get(name)
                # A module imported twice under the same name re-registers the same qualified object: fine.
                if existing is not None and _qualname(existing) != _qualname(component):
                    raise ValueError(
                        f"{self.kind} {name!r} is registered twice ({_qualname(existing)} and "
                        f"{_qualname(component)}); give one of them another name"
                    )
                self._entries[name] = component
            return component

        return add

    def _discover(self) -> None:
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
            self._discovered = True

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        self._discover()
        return sorted(self._entries.items())

    def get(self, name: str) -> T:
        self._discover()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownComponentError(self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        """The one-line message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
