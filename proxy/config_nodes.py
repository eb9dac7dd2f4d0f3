"""Reading config mappings: errors that name file, line and key, and key checks.

Shared by config.py and the modules that parse one section each.
"""

from __future__ import annotations

from .errors import ConfigError
from .policy.source import YMap


def err(message: str, node: YMap | None, key: str | None = None,
         section: str | None = None) -> ConfigError:
    line = node.line_of(key) if node is not None and key else (node.line if node else None)
    label = f"{section}.{key}" if section and key else key
    return ConfigError(message, file=node.file if node else None, line=line, key=label)


def as_map(node: object, parent: YMap, key: str) -> YMap:
    if node is None:
        empty = YMap()
        empty.line, empty.key_lines, empty.file = parent.line_of(key), {}, parent.file
        return empty
    if not isinstance(node, YMap):
        raise err("must be a mapping", parent, key)
    return node


def port(value: object, parent: YMap, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
        raise err("must be a port number", parent, key)
    return value


def check_keys(node: YMap, allowed: set[str], where: str) -> None:
    for key in node:
        if key not in allowed:
            raise err(f"unknown key (expected one of {', '.join(sorted(allowed))})",
                       node, key, where)
