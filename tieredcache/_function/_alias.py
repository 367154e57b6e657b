"""The in-process lookup key of a call (its *alias*), and when a call may have one.

The hit path looks a call up by a tuple of its arguments instead of building
the cache key (a digest), which costs several times the rest of a hit. That is
only right when two calls whose tuples are equal also have equal cache keys.
Python equality is coarser than the key: ``0.0 == -0.0``, ``Decimal('1.0') ==
Decimal('1.00')``, ``P(1) == P(1.0)`` for a dataclass, ``(1,) == (1.0,)``; and
``1 == 1.0 == True``, which the argument types in the alias tell apart. So a
call gets an alias only when every argument in it is of a type whose equality
implies equal keys; any other call is looked up by its key, which is exact.
The hit path builds the alias without looking (that check would cost a good
part of a hit); entries are only ever *stored* under an alias that passed
:func:`aliasable`, and an alias of other arguments can never equal one of
those (the types in the alias would differ, or the float would be a zero).

Arguments left out of the key (``ignore=``, a method's ``self``) are left out
of the alias too: an alias lives as long as its entry and must not keep them.
The alias is flat, ``(id, tenant, *args, *types)``: n arguments make a tuple of
2 + 2n items, so calls with different numbers of arguments never meet, and the
call's own argument tuple is not kept alive with the entry.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = ["ALIASABLE", "aliasable", "make_alias"]

# Types whose equal values always make equal keys (floats: all but the zeros).
ALIASABLE = frozenset({int, str, bytes, bool, type(None)})


def _aliasable(value: Any) -> bool:
    kind = type(value)
    return kind in ALIASABLE or (kind is float and value != 0.0)


def aliasable(args: tuple[Any, ...]) -> bool:
    """Whether positional ``args`` may be stored under an alias."""
    return all(map(_aliasable, args))


def make_alias(
    alias_id: str,
    tenant: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dropped: frozenset[int] = frozenset(),
    dropped_names: frozenset[str] = frozenset(),
) -> Hashable | None:
    """The alias of a call, or None when its arguments cannot have one (see above).
    The wrappers inline the common cases (plain positional arguments)."""
    if dropped:
        args = tuple(a for i, a in enumerate(args) if i not in dropped)
    if not all(map(_aliasable, args)):
        return None
    types = tuple(map(type, args))
    if kwargs:
        named = []
        for name in sorted(kwargs):
            if name in dropped_names:
                continue
            value = kwargs[name]
            if not _aliasable(value):
                return None
            named.append((name, value, type(value)))
        # Ends with a tuple, where a positional alias ends with a type: never equal.
        return (alias_id, tenant, *args, *types, tuple(named))
    return (alias_id, tenant, *args, *types)
