"""Name -> class registries for backbones, methods, datasets, evaluators and protocols.

A new entry is one decorated class (or factory) in one module under the registry's package.
Modules are discovered on first lookup (not at ``import harness``) so that ``harness --help`` stays
fast and never imports torch. Duplicate names are an error; unknown names suggest the nearest ones.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised for unknown or duplicate registry names (a user-facing error)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it verbatim
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A registry of named entries of one kind.

    Args:
        kind: what is registered, for messages ("backbone", "method", ...).
        package: dotted package whose modules are imported on first lookup to fill the registry.
    """

    def __init__(self, kind: str, package: Optional[str] = None, instantiate: bool = False,
                 list_hint: bool = True) -> None:
        self.kind = kind
        self.list_hint = list_hint  # `harness list <kind>s` exists for this kind
        self.instantiate = instantiate  # get() returns an instance of the registered class
        self.package = package
        self._entries: Dict[str, T] = {}
        self._aliases: Dict[str, str] = {}
        self._discovered = package is None

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, *, aliases: tuple = ()) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (and ``aliases``). Duplicates raise."""

        def deco(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return deco

    def add(self, name: str, obj: T, *, aliases: tuple = ()) -> None:
        self._discover()  # built-in entries first, so a collision with them is caught here, not later
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                where = self._entries.get(key) or self._entries[self._aliases[key]]
                raise RegistryError(
                    f"duplicate {self.kind} name {key!r}: already registered by "
                    f"{getattr(where, '__module__', '?')}.{getattr(where, '__qualname__', where)}"
                )
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name
        try:
            setattr(obj, "registry_name", name)
        except (AttributeError, TypeError):
            pass

    # -- lookup ------------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def canonical(self, name: str) -> str:
        self._discover()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted([*self._entries, *self._aliases])
        near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        listing = f" Run `harness list {self.kind}s` to see all {len(self._entries)}." if self.list_hint else ""
        raise RegistryError(f"unknown {self.kind} {name!r}.{hint}{listing}")

    def get(self, name: str) -> T:
        obj = self._entries[self.canonical(name)]
        return obj() if self.instantiate and isinstance(obj, type) else obj  # type: ignore[return-value]

    def names(self) -> List[str]:
        self._discover()
        return sorted(self._entries)

    def aliases_of(self, name: str) -> List[str]:
        return sorted(a for a, n in self._aliases.items() if n == name)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> List[tuple]:
        return [(n, self._entries[n]) for n in self.names()]


def describe(obj: Any) -> str:
    """First line of an entry's docstring, for ``harness list``."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


BACKBONES: Registry = Registry("backbone", "harness.backbones")
METHODS: Registry = Registry("method", "harness.methods")
DATASETS: Registry = Registry("dataset", "harness.datasets", instantiate=True)
EVALUATORS: Registry = Registry("evaluator", "harness.evaluators")
#: backbone families ("open_clip", "timm"): Backbone subclasses with ``build(spec, weights_path)``
BACKBONE_FAMILIES: Registry = Registry("backbone family", "harness.backbones", list_hint=False)
