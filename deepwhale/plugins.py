"""Named registries that installed packages can extend through entry points.

A :class:`Registry` maps names to factories. Names come from two places:

* code in deepwhale (or in a user's script) that calls :meth:`Registry.register`;
* installed distributions that declare an entry point in the registry's group, e.g. in a
  plugin's ``pyproject.toml``::

      [project.entry-points."deepwhale.augmenters"]
      shout = "my_plugin.augment:Shout"

Entry points are discovered with :func:`importlib.metadata.entry_points` (PEP 621 /
the PyPA entry-points specification) and imported only when their name is first asked for, so
a broken plugin never breaks a registry lookup of another name.

This module is layer 0: it imports nothing of deepwhale's.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PluginError", "Registry", "entry_points"]

T = TypeVar("T")


class PluginError(LookupError):
    """A name is unknown, registered twice, or its entry point fails to load.

    Subclass of :class:`LookupError`; the message names the registry group, the name and, for
    entry points, the distribution and the ``module:attr`` value.
    """


def entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points of ``group`` declared by the installed distributions, by name.

    Args:
        group: the entry-point group, e.g. ``"deepwhale.augmenters"``.

    Returns:
        ``{name: EntryPoint}``, not loaded.

    Raises:
        PluginError: two distributions declare the same name with different values.
    """
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise PluginError(
                f"entry point {ep.name!r} in group {group!r} is declared twice: "
                f"{previous.value!r} ({_dist_name(previous)}) and {ep.value!r} ({_dist_name(ep)})"
            )
        found[ep.name] = ep
    return found


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"distribution {dist.name}" if dist is not None else "unknown distribution"


class Registry(Generic[T]):
    """Names to objects (usually factories), extended by the entry-point group ``group``.

    Names registered in code take precedence over entry points of the same name; entry points
    are looked up afresh when a name is not registered in code (so a plugin installed while the
    process runs is seen), and a loaded entry point is cached.

    Args:
        group: the entry-point group, e.g. ``"deepwhale.augmenters"``.
        kind: what the objects are, for error messages (e.g. ``"augmenter"``).
    """

    def __init__(self, group: str, kind: str = "plugin") -> None:
        self.group = group
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loaded: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` and return it unchanged.

        Raises:
            ValueError: ``name`` is empty or not a string.
            PluginError: ``name`` is already registered in code.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise PluginError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> bool:
        """Forget ``name``: drop its registration in code and its loaded entry point, so the
        next :meth:`get` loads a declared entry point afresh (or fails). A test that registers
        a name, or loads a plugin, calls this to leave the registry as it found it.

        Returns:
            True if there was anything to drop (like :meth:`set.discard`, no error otherwise).
        """
        found = name in self._items or name in self._loaded
        self._items.pop(name, None)
        self._loaded.pop(name, None)
        return found

    def get(self, name: str) -> T:
        """The object registered as ``name``, loading its entry point if needed.

        Raises:
            PluginError: ``name`` is unknown (the message lists the known names), or its entry
                point fails to import (the message names the distribution and the value).
        """
        if name in self._items:
            return self._items[name]
        if name in self._loaded:
            return self._loaded[name]
        eps = entry_points(self.group)
        if name not in eps:
            known = ", ".join(self.names()) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; available: {known}")
        ep = eps[name]
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(
                f"{self.kind} {name!r}: entry point {ep.value!r} of group {self.group!r} "
                f"({_dist_name(ep)}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        self._loaded[name] = obj
        return obj

    def names(self, *, sort: bool = True) -> list[str]:
        """Names registered in code or declared by an installed entry point.

        Args:
            sort: if true, all names sorted; if false, the names registered in code in the
                order they were registered, then the other entry-point names sorted.
        """
        declared = entry_points(self.group)
        if sort:
            return sorted(set(self._items) | set(declared))
        return list(self._items) + sorted(n for n in declared if n not in self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in entry_points(self.group))
