"""What every route family shares for the life of the app: the configuration, the
governor, the session guard, the holds, the upstream client, the authenticator and
OPA.

Its own module so that the route modules (llm, mcp, apis, batches) and the app that
builds it import it from one place that imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from ..approvals.holds import Holds
from ..auth.authenticator import Authenticator
from ..config import Config
from ..governor import Governor
from ..linked_calls import LinkedCalls
from ..opa.client import OpaClient
from ..sessions.guard import SessionGuard
from ..sessions.rewrites import MemoryRewrites, Rewrites
from .flows import SessionFlows


@dataclass(slots=True)
class Context:
    config: Config
    governor: Governor
    guard: SessionGuard
    holds: Holds
    client: aiohttp.ClientSession
    auth: Authenticator
    opa: OpaClient | None = None  # None: no `opa:` section
    # What tether changed in Responses answers, and the ids continued streams stand for.
    rewrites: Rewrites = field(default_factory=MemoryRewrites)
    flows: SessionFlows | None = None  # None: no rule reads the session history
    linked: LinkedCalls | None = None  # tools carried out by API operations (linked_calls.py)
