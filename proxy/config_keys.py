"""The config's keys as data: what each section accepts, written once.

Every section's parser takes its allowed keys from a `Table` (config_tables.py), so a
key cannot be accepted without being documented; the same tables write the reference
(docs/config-reference.md) and the JSON Schema editors use (config_reference.py).

A key's `type` is one of: string, integer, number, boolean, duration (a number of
seconds or text like 30s, 10m, 1h), strings (a list of strings), string|strings (one
or a list), mapping (a mapping with the keys of `keys`), map (names of your choice,
each mapped to a value of `each`, or of `value` when the values are plain), list (a
list of mappings with the keys of `each`), mapping|list (one such mapping or a list of
them), any. `values` limits a string to a closed set; `nullable`: `null` is accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

TYPES = frozenset({"string", "integer", "number", "boolean", "duration", "strings",
                   "string|strings", "mapping", "map", "list", "mapping|list", "any"})


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: object = _Unset()


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    type: str
    meaning: str
    default: object = UNSET          # as written in YAML; UNSET: none (absent or required)
    values: tuple[str, ...] = ()     # a closed set of strings
    keys: Table | None = None        # type mapping: its keys
    each: Table | None = None        # map, list, mapping|list: each item's keys
    value: str = "any"               # map without `each`: the type of each value
    nullable: bool = False
    required: bool = False

    def __post_init__(self) -> None:
        assert self.type in TYPES, self.type
        assert self.value in TYPES, self.value


@dataclass(frozen=True, slots=True)
class Table:
    """The keys of one mapping. `open`: the loader does not check the mapping's keys
    (the schema then accepts others too)."""

    title: str
    keys: tuple[Key, ...]
    open: bool = False
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset(k.name for k in self.keys))
        assert len(self.names) == len(self.keys), f"{self.title}: a key is listed twice"

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys)

    def __getitem__(self, name: str) -> Key:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(name)

    def expected(self) -> str:
        return ", ".join(sorted(self.names))


def table(title: str, *keys: Key, open: bool = False) -> Table:
    return Table(title, keys, open)
