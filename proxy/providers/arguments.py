"""Tool-call arguments: strict JSON, one object, no duplicate keys.

A model's argument text is untrusted. Duplicate keys are refused because
parsers disagree on which one wins (Python keeps the last, others the first),
so a rule could check one value while the tool runs with the other. NaN and
Infinity are refused because they are not JSON. A lone UTF-16 surrogate is refused
because it is not text (the call is denied as `tether:malformed-call`, and audited).
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import strict_json


def parse_arguments(raw: str) -> tuple[Mapping[str, object] | None, str | None]:
    """Return (arguments, None) or (None, why they were refused)."""
    if not raw.strip():
        return {}, None
    try:
        value = strict_json.loads(raw)
    except strict_json.DuplicateKey as e:
        return None, f"tool-call arguments hold a {e}"
    except strict_json.NotText as e:
        return None, f"tool-call arguments hold {e}"
    except RecursionError:
        return None, "tool-call arguments are nested too deeply"
    except ValueError as e:
        return None, f"tool-call arguments are not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"tool-call arguments must be a JSON object, not {type(value).__name__}"
    return value, None
