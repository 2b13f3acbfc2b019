"""Every shortcut the 100M-window settlement takes, in one place, each beside the plain definition
it must equal. ``tests/unit/test_billing_fastpath.py`` checks each against that definition with
Hypothesis; nothing else in billing may skip a check or cache a result on its own.

- ``unchecked_builder``: a constructor that skips ``__post_init__``, for items and credits the core
  has just computed from checked inputs (about two per item).
- ``CheckedTexts``: remembers ids that passed the text check (a settlement checks the same firm,
  provider and class ids once per item).
- ``cached_isoformat``: ``date.isoformat`` memoised (a settlement has a few dozen distinct days).
- ``paused_cyclic_gc``: no cyclic garbage collection while millions of acyclic objects are built.

Two memos live beside what they remember, each a pure function of immutable input, and are
tested here too: ``model.month_of`` (an ``lru_cache``) and ``pricing.RateCard.rate_for`` (a dict
over the card's own ``_select``).

The integer-fen arithmetic of charge and subsidy amounts lives in ``money.py``
(``charge_amount``, ``subsidy_cents``), proved against exact ``Fraction`` definitions by
``tests/unit/test_billing_money_fastpath.py``.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from typing import Any, TypeVar

_T = TypeVar("_T")


def unchecked_builder(cls: type[_T]) -> Callable[..., _T]:
    """A constructor of a frozen slots dataclass that skips ``__post_init__``, taking every field
    positionally: only for values the core has just computed from checked inputs. Generated like
    dataclasses' own ``__init__``, but setting each slot through its descriptor, which is three times
    faster than frozen ``__init__``'s setattr calls. Plain definition: ``cls(*fields)``."""
    names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{name}": getattr(cls, name).__set__ for name in names})
    body = "".join(f"    _set_{name}(obj, {name})\n" for name in names)
    exec(f"def build({', '.join(names)}):\n    obj = _new(_cls)\n{body}    return obj\n", namespace)
    build: Callable[..., _T] = namespace["build"]
    return build


class CheckedTexts:
    """A bounded set of strings that passed ``check``: ``verify(value, name)`` equals ``check(value,
    name)`` (it raises the same error for a bad value) but skips the work for a string seen before."""

    __slots__ = ("_check", "_good", "_limit")

    def __init__(self, check: Callable[[object, str], None], limit: int = 1_000_000) -> None:
        self._check = check
        self._good: set[str] = set()
        self._limit = limit

    def verify(self, value: object, name: str) -> None:
        if type(value) is str and value in self._good:
            return
        self._check(value, name)
        if type(value) is str and len(self._good) < self._limit:
            self._good.add(value)


def cached_isoformat() -> Callable[[date], str]:
    """``date.isoformat`` memoised; a new cache per call (one per settlement write)."""
    return functools.lru_cache(maxsize=None)(date.isoformat)


@contextmanager
def paused_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a large settlement builds millions of acyclic objects,
    and the collector's passes over them cost about 30 % of the pure core's time. Reference counting
    still frees everything; the collector runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
