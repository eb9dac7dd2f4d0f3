"""Which instance wrote a record: the `instance` field of every v4 audit record.

An instance is one hash chain: one log file and its rotated files. Its id is a
name (`audit.instance`, else the environment's TETHER_INSTANCE or POD_NAME, else
the host name) plus a random suffix made when the log is new. The suffix is kept
in the log - every record carries the id - so a process that restarts on the
same log (a container restart with its emptyDir) continues the same chain under
the same id, and two pods that happen to share a name (a StatefulSet pod
replaced, with a fresh volume) never share one.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping

from ..config_nodes import err
from ..policy.source import YMap

MAX_NAME = 200
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None


def valid_id(instance: str) -> bool:
    """A name and its suffix, as `new_instance` makes them."""
    return len(instance) <= MAX_NAME + 9 and _NAME.fullmatch(instance) is not None


def default_name(env: Mapping[str, str] | None = None) -> str:
    """TETHER_INSTANCE, POD_NAME (the downward API), else the host name; characters
    outside the allowed set become `-`."""
    env = os.environ if env is None else env
    name = env.get("TETHER_INSTANCE") or env.get("POD_NAME") or socket.gethostname() or "tether"
    name = re.sub(r"[^A-Za-z0-9._:/-]", "-", name)[:MAX_NAME].lstrip("._:/-")
    return name or "tether"


def new_instance(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def parse_instance(node: YMap) -> str | None:
    value = node.get("instance")
    if value is None:
        return None
    if not isinstance(value, str) or not valid_name(value):
        raise err(f"must be a name of letters, digits and . _ : / - (at most {MAX_NAME}), "
                  "starting with a letter or digit", node, "instance", "audit")
    return value
