"""Model prices: USD per million tokens, matched by glob on the model id.

Costs are kept in micro-dollars (integers), which is exactly "tokens × USD per
million tokens", so budgets add and compare without float drift.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model import Usage

# Model names come from agents: at most this many, this long, are remembered (others are
# matched each time), so an agent cannot pin memory with made-up names.
PRICES_CACHED, CACHED_LENGTH = 4096, 256


@dataclass(frozen=True, slots=True)
class Price:
    input: float   # USD per million input tokens
    output: float  # USD per million output tokens


@dataclass(frozen=True, slots=True)
class PriceTable:
    entries: tuple[tuple[re.Pattern[str], Price], ...]
    default: Price
    # Each model's price, found once: a request prices its model twice (reserve, settle),
    # and the shipped table is a few dozen globs.
    _found: dict[str, Price] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, entries: Sequence[tuple[str, Price]], default: Price) -> PriceTable:
        return cls(tuple((re.compile(fnmatch.translate(g.lower())), p) for g, p in entries),
                   default)

    def price(self, model: str) -> Price:
        found = self._found.get(model)
        if found is not None:
            return found
        name = model.lower()
        found = next((price for pattern, price in self.entries if pattern.fullmatch(name)),
                     self.default)
        if len(self._found) < PRICES_CACHED and len(model) <= CACHED_LENGTH:
            self._found[model] = found
        return found

    def cost_micro_usd(self, model: str, usage: Usage) -> int:
        p = self.price(model)
        return math.ceil(usage.input_tokens * p.input + usage.output_tokens * p.output)
