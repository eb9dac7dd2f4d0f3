"""Model prices: USD per million tokens, matched by glob on the model id.

Costs are kept in micro-dollars (integers), which is exactly "tokens × USD per
million tokens", so budgets add and compare without float drift.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..model import Usage


@dataclass(frozen=True, slots=True)
class Price:
    input: float   # USD per million input tokens
    output: float  # USD per million output tokens


@dataclass(frozen=True, slots=True)
class PriceTable:
    entries: tuple[tuple[re.Pattern[str], Price], ...]
    default: Price

    @classmethod
    def build(cls, entries: Sequence[tuple[str, Price]], default: Price) -> PriceTable:
        return cls(tuple((re.compile(fnmatch.translate(g.lower())), p) for g, p in entries),
                   default)

    def price(self, model: str) -> Price:
        name = model.lower()
        for pattern, price in self.entries:
            if pattern.fullmatch(name):
                return price
        return self.default

    def cost_micro_usd(self, model: str, usage: Usage) -> int:
        p = self.price(model)
        return math.ceil(usage.input_tokens * p.input + usage.output_tokens * p.output)
