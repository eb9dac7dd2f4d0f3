"""Tool names as the policy compares them.

A model can write `Delete_Volume`, ` delete_volume` or `delete\u200b_volume`; an
agent's dispatcher may still run `delete_volume`. Rules therefore match on a
normal form: Unicode NFKC, invisible and control characters removed, outer
whitespace stripped, case folded. The same form is used for globs in rules, so
a rule and a call meet in the middle whatever their spelling.
"""

from __future__ import annotations

import functools
import unicodedata

_DROP = {"Cf", "Cc", "Cs", "Co", "Cn", "Zl", "Zp"}
# Only names up to this length are cached: the cache holds 8192 entries, and a request
# may carry a name as long as its body (10 MB), so caching every name would let an
# agent pin gigabytes with a few thousand requests.
CACHED_LENGTH = 256


def normalize(name: str) -> str:
    """Cached (bounded in entries and in entry size): tool names and argument keys
    repeat from call to call."""
    return _cached(name) if len(name) <= CACHED_LENGTH else _normal(name)


def _normal(name: str) -> str:
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _DROP)
    return text.strip().casefold()


_cached = functools.lru_cache(maxsize=8192)(_normal)
