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
from .flows import SessionFlows
from .response_aliases import ResponseAliases


@dataclass(slots=True)
class Context:
    config: Config
    governor: Governor
    guard: SessionGuard
    holds: Holds
    client: aiohttp.ClientSession
    auth: Authenticator
    opa: OpaClient | None = None  # None: no `opa:` section
    aliases: ResponseAliases = field(default_factory=ResponseAliases)
    flows: SessionFlows | None = None  # None: no rule reads the session history
    linked: LinkedCalls | None = None  # tools carried out by API operations (linked_calls.py)
