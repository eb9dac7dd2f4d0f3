"""The `telemetry:` section: how tether spells its traces.

    telemetry:
      legacy_gen_ai_system: false   # true: inference spans also carry the deprecated
                                    # gen_ai.system (az.ai.openai for Azure), for
                                    # dashboards not yet moved to gen_ai.provider.name

Where traces go is not here: the standard OTEL_* variables say that (tracing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config_nodes import as_map, check_keys, err
from .config_tables_run import TELEMETRY
from .policy.source import YMap


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    legacy_gen_ai_system: bool = False


def parse_telemetry(node: object, parent: YMap) -> TelemetrySettings:
    section = as_map(node, parent, "telemetry")
    check_keys(section, TELEMETRY, "telemetry")
    legacy = section.get("legacy_gen_ai_system", False)
    if not isinstance(legacy, bool):
        raise err("must be true or false", section, "legacy_gen_ai_system", "telemetry")
    return TelemetrySettings(legacy_gen_ai_system=legacy)
