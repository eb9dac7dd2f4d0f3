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


@functools.lru_cache(maxsize=8192)
def normalize(name: str) -> str:
    """Cached (bounded): tool names and argument keys repeat from call to call."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _DROP)
    return text.strip().casefold()
