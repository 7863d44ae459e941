"""Typed dataclasses from YAML mappings: the one loader behind the data pipeline's config
(:mod:`deepwhale.data.config`) and the training config (:mod:`deepwhale.train.config`).

A :class:`Loader` builds a dataclass from a mapping: it rejects unknown keys (the message names
the dotted key and lists the valid ones), converts each value to its field's annotated type
(``int``, ``float``, ``bool``, ``str``, ``list[X]``, ``X | None``, nested dataclasses), and
offers the range / choice / order checks the sections' ``__post_init__`` methods use. Each
config family keeps its own error class (a subclass of :class:`ConfigError`) and wording; the
loader is configured with them.

Two coercion modes:

* ``strict`` (the data pipeline): values must already have the field's type, as YAML gives it
  (``"yes"`` is not a bool; an int is accepted for a float). A mismatch names both types:
  ``quality.min_chars: expected int, got str ('many')``.
* lenient (the training config, whose ``--set key=value`` overrides may arrive as strings):
  ``"3e-4"`` becomes a float, ``"yes"`` a bool, ``"a,b"`` a list, ``"null"`` None. A value that
  does not convert names the key and the value: ``train.steps: expected an integer, got 'abc'``.

pydantic is not used: only the ``serve`` extra depends on it, and the data and train configs
are plain dataclasses whose error wording the CLIs and tests rely on.

Layer 0: this module imports nothing of deepwhale's.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "Loader", "field_types"]


class ConfigError(ValueError):
    """Base of the config errors (``PipelineConfigError``, ``TrainConfigError``): a key that is
    unknown, a value of the wrong type or out of range. The message names the dotted key."""


def field_types(cls: type) -> dict[str, Any]:
    """The annotated type of each field of dataclass ``cls``, by field name.

    String annotations (``from __future__ import annotations``) are resolved against the
    class's module; a field whose annotation cannot be resolved gets ``typing.Any`` (its value
    is passed through unchecked).
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a name only the defining scope knows (a class made in a function)
        hints = {}
    return {
        f.name: hints.get(f.name, f.type if isinstance(f.type, type) else Any)
        for f in dataclasses.fields(cls)
    }


def _bounds(lo: Any, hi: Any) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


@dataclass(frozen=True)
class Loader:
    """How one config family loads its sections and words its errors.

    Attributes:
        error: the exception class raised (a :class:`ConfigError` subclass).
        strict: values must already have the field's type (see the module docstring); False
            converts strings (command-line overrides).
        unknown_key: message for a key the dataclass lacks; ``str.format`` fields ``where``
            (the mapping's dotted location, ``config`` at the top), ``name`` (the bad key),
            ``key`` (its full dotted key), ``valid`` (the field names, comma-separated) and
            ``in_where`` (`` in <where>`` below the top level, else empty).
        not_mapping: message for a section that is not a mapping; fields ``where``, ``value``.
        none_is_empty: a ``None`` section (``quality:`` with nothing after it) means ``{}``.
        passthrough: exception types a dataclass's ``__post_init__`` may raise whose message
            already names the key; they are re-raised as ``error`` with the same message.
    """

    error: type[ConfigError] = ConfigError
    strict: bool = False
    unknown_key: str = "unknown config key '{key}'; valid keys{in_where}: {valid}"
    not_mapping: str = "{where}: expected a mapping, got {value!r}"
    none_is_empty: bool = False
    passthrough: tuple[type[BaseException], ...] = ()

    # ------------------------------------------------------------------ building

    def build(self, cls: type, data: Any, where: str = "") -> Any:
        """An instance of dataclass ``cls`` from mapping ``data``; nested dataclass fields are
        built from nested mappings.

        Args:
            cls: the dataclass.
            data: the mapping (``None`` counts as ``{}`` under ``none_is_empty``).
            where: the dotted location of ``data`` (``optim``, ``input[0]``; ``""`` at the top),
                the prefix of every key in the messages.

        Raises:
            ConfigError: (``self.error``) ``data`` is not a mapping, names an unknown key, holds
                a value of the wrong type, lacks a required field, or ``cls.__post_init__``
                rejects a value.
        """
        label = where or "config"
        if data is None and self.none_is_empty:
            data = {}
        if not isinstance(data, dict):
            raise self.error(self.not_mapping.format(where=label, value=data))
        hints = field_types(cls)
        for name in data:
            if name not in hints:
                raise self.error(
                    self.unknown_key.format(
                        where=label,
                        name=name,
                        key=self.key(where, name),
                        valid=", ".join(hints),
                        in_where=f" in {where}" if where else "",
                    )
                )
        kwargs = {
            name: self.coerce(v, hints[name], self.key(where, name)) for name, v in data.items()
        }
        try:
            return cls(**kwargs)
        except ConfigError as e:
            if isinstance(e, self.error):
                raise
            raise self.error(str(e)) from None
        except self.passthrough as e:
            raise self.error(str(e)) from None
        except (TypeError, ValueError) as e:  # a required field is missing, or a plain check
            raise self.error(f"{label}: {e}") from None

    @staticmethod
    def key(where: str, name: str) -> str:
        """The dotted key of field ``name`` in the mapping at ``where`` (``optim.lr``)."""
        return f"{where}.{name}" if where else name

    def coerce(self, value: Any, hint: Any, key: str) -> Any:
        """``value`` converted to type ``hint`` (see the module docstring for the two modes).

        Raises:
            ConfigError: (``self.error``) the value does not have or convert to the type; the
                message starts with ``key``.
        """
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self.build(hint, value, key)
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return self._coerce_union(value, hint, key)
        if hint is list or origin is list:
            return self._coerce_list(value, hint, key)
        if hint in (bool, int, float, str):
            convert = self._strict_scalar if self.strict else self._lenient_scalar
            return convert(value, hint, key)
        if self.strict and isinstance(hint, type) and hint not in (object, Any):
            if not isinstance(value, hint):
                self._mismatch(value, hint, key)
        return value

    def _coerce_union(self, value: Any, hint: Any, key: str) -> Any:
        args = typing.get_args(hint)
        kinds = [a for a in args if a is not type(None)]
        optional = len(kinds) < len(args)
        if optional and (value is None or (not self.strict and _is_null(value))):
            return None
        first: ConfigError | None = None
        for kind in kinds:
            try:
                return self.coerce(value, kind, key)
            except ConfigError as e:
                first = first or e
        raise first  # type: ignore[misc]

    def _coerce_list(self, value: Any, hint: Any, key: str) -> list:
        args = typing.get_args(hint)
        if not self.strict and isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if self.strict and not isinstance(value, list):
            self._mismatch(value, list, key)
        if not isinstance(value, list | tuple):
            raise self.error(f"{key}: expected a list, got {value!r}")
        if not args:
            return list(value)
        return [self.coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]

    def _mismatch(self, value: Any, hint: type, key: str) -> typing.NoReturn:
        raise self.error(f"{key}: expected {hint.__name__}, got {type(value).__name__} ({value!r})")

    def _strict_scalar(self, value: Any, hint: type, key: str) -> Any:
        is_bool = isinstance(value, bool)
        if hint is bool:
            ok = is_bool
        elif hint is float:
            ok = isinstance(value, int | float) and not is_bool
        elif hint is int:
            ok = isinstance(value, int) and not is_bool
        else:
            ok = isinstance(value, str)
        if not ok:
            self._mismatch(value, hint, key)
        return float(value) if hint is float else value

    def _lenient_scalar(self, value: Any, hint: type, key: str) -> Any:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise self.error(f"{key}: expected true or false, got {value!r}")
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
            raise self.error(f"{key}: expected an integer, got {value!r}")
        if hint is float:
            if isinstance(value, bool):
                raise self.error(f"{key}: expected a number, got {value!r}")
            try:
                out = float(value)
            except (TypeError, ValueError):
                raise self.error(f"{key}: expected a number, got {value!r}") from None
            if not math.isfinite(out):
                raise self.error(f"{key}: expected a finite number, got {value!r}")
            return out
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise self.error(f"{key}: expected a string, got {value!r}")

    # ------------------------------------------------------------------ checks

    def require(self, ok: bool, key: str, message: str) -> None:
        """Raise ``error("<key>: <message>")`` unless ``ok``."""
        if not ok:
            raise self.error(f"{key}: {message}")

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> None:
        """Raise ``error("<key>: 'x' is not one of a, b")`` unless ``value in allowed``."""
        if value not in allowed:
            raise self.error(f"{key}: {value!r} is not one of {', '.join(allowed)}")

    def check_range(self, key: str, value: Any, lo: Any = None, hi: Any = None) -> None:
        """Raise ``error("<key> must be in [lo, hi], got v")`` unless ``lo <= value <= hi``
        (``None`` bounds and a ``None`` value are not checked)."""
        if value is None:
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(f"{key} must be in {_bounds(lo, hi)}, got {value}")

    def check_order(self, where: str, low: str, high: str, obj: Any) -> None:
        """Raise ``error`` unless ``obj.<low> <= obj.<high>``; the message names both dotted
        keys and values (``quality.min_words (9) must not exceed quality.max_words (3)``)."""
        a, b = getattr(obj, low), getattr(obj, high)
        if a is not None and b is not None and a > b:
            raise self.error(
                f"{self.key(where, low)} ({a}) must not exceed {self.key(where, high)} ({b})"
            )


def _is_null(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in ("none", "null")
