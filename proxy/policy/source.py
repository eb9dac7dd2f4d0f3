"""YAML text to plain data that remembers where each mapping and key came from.

Parsing takes text, never a path, so it stays free of I/O; the caller names the
file for error messages. Duplicate keys are an error: in a policy, a second
`action:` silently replacing the first is exactly the mistake to catch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import yaml

from ..errors import ConfigError


class YMap(dict[str, Any]):
    """A YAML mapping with the 1-based line (and column) of the mapping and of each key."""

    line: int = 0
    key_lines: dict[str, int]
    file: str | None = None
    column: int = 0                                        # 0: not known
    key_columns: Mapping[str, int] = MappingProxyType({})  # replaced, never mutated

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)

    def column_of(self, key: str | None) -> int | None:
        column = self.key_columns.get(key, 0) if key is not None else self.column
        return column or None


class _Loader(yaml.SafeLoader):
    file: str | None = None


def _mapping(loader: _Loader, node: yaml.MappingNode) -> YMap:
    loader.flatten_mapping(node)
    out = YMap()
    out.line = node.start_mark.line + 1
    out.column = node.start_mark.column + 1
    out.key_lines = {}
    columns: dict[str, int] = {}
    out.key_columns = columns
    out.file = loader.file
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        line = key_node.start_mark.line + 1
        if key in out:
            raise ConfigError(f"duplicate key {key!r}", file=loader.file, line=line)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
        columns[key] = key_node.start_mark.column + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str, file: str | None = None) -> object:
    loader = _Loader(text)
    loader.file = file
    try:
        return loader.get_single_data()
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        column = e.problem_mark.column + 1 if e.problem_mark else None
        raise ConfigError(f"invalid YAML: {e.problem}", file=file, line=line,
                          column=column) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", file=file) from e
    finally:
        loader.dispose()
