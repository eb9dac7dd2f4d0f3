"""Reading config mappings: errors that name file, line and key, key checks, and the
collector `tether check` uses to report every error in one run.

Shared by config.py and the modules that parse one section each.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet

from .config_keys import Table
from .errors import ConfigError
from .policy.source import YMap


def err(message: str, node: YMap | None, key: str | None = None,
         section: str | None = None) -> ConfigError:
    line = node.line_of(key) if node is not None and key else (node.line if node else None)
    label = f"{section}.{key}" if section and key else key
    column = node.column_of(key if key in (node or {}) else None) if node is not None else None
    return ConfigError(message, file=node.file if node else None, line=line, key=label,
                       column=column)


def as_map(node: object, parent: YMap, key: str) -> YMap:
    if node is None:
        empty = YMap()
        empty.line, empty.key_lines, empty.file = parent.line_of(key), {}, parent.file
        return empty
    if not isinstance(node, YMap):
        raise err("must be a mapping", parent, key)
    return node


def port(value: object, parent: YMap, key: str, section: str | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
        raise err("must be a port number", parent, key, section)
    return value


def check_keys(node: YMap, allowed: Table | AbstractSet[str], where: str) -> None:
    """`allowed`: a section's Table (config_tables*.py), so every key accepted is
    documented; a plain set only narrows a table (a sink type's own keys)."""
    names = allowed.names if isinstance(allowed, Table) else allowed
    for key in node:
        if key not in names:
            raise err(f"unknown key (expected one of {', '.join(sorted(names))})",
                       node, key, where)


class Problems:
    """Where config errors go. Loading for `tether serve` stops at the first one
    (`collect` False: it is raised); `tether check` collects them and the loader goes
    on with the next key, section, rule or file, in place of what failed its fallback."""

    def __init__(self, collect: bool = False) -> None:
        self.collect = collect
        self.errors: list[ConfigError] = []

    def run[T](self, parse: Callable[[], T], fallback: T) -> T:
        try:
            return parse()
        except ConfigError as e:
            if not self.collect:
                raise
            self.errors.append(e)
            return fallback

    def add(self, error: ConfigError) -> None:
        if not self.collect:
            raise error
        self.errors.append(error)
