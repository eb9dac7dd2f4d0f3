"""tether's own upstream keys: read when a request leaves, never stored in the config.

A key comes from an environment variable (`api_key_env`) or a file
(`api_key_file`, typically a Kubernetes Secret mounted as a volume). A file is
checked with one stat per request (device, inode, mtime, ctime, size): on a
tmpfs that costs about a microsecond, far below a request's own cost, and a
rotated or revoked key takes effect on the very next request instead of after
a polling interval. The kubelet rotates a Secret by writing a new directory and
swapping the `..data` symlink; stat follows the link, so the new file's inode
shows the change. A plain overwrite changes mtime/size.

A file that vanishes or reads empty after a good read (mid-rotation, a swap
caught half-way) keeps the last good key, logged once. A file never read
successfully gives no key: the request is refused 503 (`CredentialsUnavailable`)
rather than sent with no credentials or the agent's. Keys never appear in logs,
reprs or errors; only the path or variable name does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..errors import UpstreamError
from ..small_file import read_small_file
from ..upstreams import Upstream

log = logging.getLogger("tether.credentials")

type Signature = tuple[int, int, int, int, int]
MAX_KEY_FILE = 64 * 1024  # a key is a few hundred bytes; a bigger file is a mistake


class CredentialsUnavailable(UpstreamError):
    """503: tether is configured to hold a key for this upstream and has none."""

    status = 503
    code = "upstream_credentials_unavailable"


def usable(text: str) -> str | None:
    """The key without surrounding whitespace; None if empty or if it holds a control
    character or inner whitespace (a CR/LF would split the header it is put in)."""
    key = text.strip()
    if not key or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        return None
    return key


class KeyFile:
    """One key file, re-read when its stat signature changes."""

    __slots__ = ("path", "_signature", "_key", "_complained")

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: Signature | None = None
        self._key: str | None = None
        self._complained = False

    def __repr__(self) -> str:
        return f"KeyFile({self.path!r}, loaded={self._key is not None})"

    def _complain(self, why: str) -> None:
        if self._complained:
            return
        self._complained = True
        if self._key is None:
            log.error("upstream key file %s %s; requests that need it are refused (503)",
                      self.path, why)
        else:
            log.warning("upstream key file %s %s; keeping the last key read from it",
                        self.path, why)

    def key(self) -> str | None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._complain(f"cannot be read ({e.strerror})")
            return self._key
        signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if signature == self._signature:
            return self._key
        try:
            key = usable(read_small_file(self.path, MAX_KEY_FILE).decode("utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            self._complain(f"cannot be read ({getattr(e, 'strerror', None) or 'not UTF-8'})")
            return self._key
        if key is None:
            # Not remembered as seen: a writer may be half-way, the next request looks again.
            self._complain("is empty or holds whitespace or control characters")
            return self._key
        if self._key is not None and key != self._key:
            log.info("upstream key file %s changed; the new key is in use", self.path)
        self._signature, self._key, self._complained = signature, key, False
        return key


_FILES: dict[str, KeyFile] = {}


def key_file(path: str) -> KeyFile:
    found = _FILES.get(path)
    if found is None:
        found = _FILES[path] = KeyFile(path)
    return found


def source_of(upstream: Upstream) -> str:
    """Where the key is meant to come from, for messages (never the key)."""
    if upstream.api_key_file:
        return f"the file {upstream.api_key_file}"
    return f"the environment variable {upstream.api_key_env}"


def upstream_key(upstream: Upstream, env: Mapping[str, str] | None = None) -> str | None:
    """tether's key for `upstream`, or None when none is configured or none can be had
    right now (callers decide: refuse, or pass the agent's own under `pass`)."""
    if upstream.api_key_file:
        return key_file(upstream.api_key_file).key()
    if upstream.api_key_env:
        env = os.environ if env is None else env
        return usable(env.get(upstream.api_key_env, ""))
    return None


def required_key(upstream: Upstream, env: Mapping[str, str] | None = None) -> str | None:
    """As upstream_key, but a configured source that yields nothing is refused, unless
    the upstream passes the agent's own credentials (then they go instead)."""
    key = upstream_key(upstream, env)
    if key is None and upstream.has_key_source and not upstream.pass_agent_credentials:
        raise CredentialsUnavailable(
            f"tether has no key for the {upstream.name} upstream ({source_of(upstream)} is "
            "missing, empty or unreadable); the request was not forwarded")
    return key
