"""SigV4 for Bedrock: tether signs the upstream request with its own AWS credentials.

The agent's signature cannot survive a rewrite (and the agent should not hold
real AWS keys), so its `Authorization` and `X-Amz-*` headers are dropped and the
request is signed anew with botocore's signer over the exact URL, headers and
body that are sent.

Credentials come from `upstreams.bedrock.aws_credentials_file` (re-read when it
changes) when set, else from botocore's usual chain (environment, shared config,
container or instance role). The chain is resolved once and kept while the
`AWS_*` variables it reads stay the same: role credentials refresh themselves,
and a change of the environment (a rotated key, a test's) starts a new chain.
A chain that found nothing is asked again at most once a minute, so a missing
role does not cost a metadata-service timeout on every request.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import SharedCredentialProvider
from botocore.session import Session
from multidict import CIMultiDict

from ..errors import UpstreamError
from ..upstreams import Upstream
from .keys import CredentialsUnavailable

_REGION = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com$")
log = logging.getLogger("tether.credentials")
SERVICE = "bedrock"
RETRY_EMPTY_S = 60.0
# What botocore's chain reads from the environment; a change starts a new chain.
_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
        "AWS_EC2_METADATA_DISABLED")


class _Chain:
    def __init__(self) -> None:
        self._env: tuple[str | None, ...] | None = None
        self._session: Session | None = None
        self._credentials: Any = None
        self._looked_at = 0.0

    def session(self) -> Session:
        env = tuple(os.environ.get(k) for k in _ENV)
        if self._session is None or env != self._env:
            self._env, self._session = env, Session()
            self._credentials, self._looked_at = None, 0.0
        return self._session

    def credentials(self) -> Any:
        session = self.session()
        now = time.monotonic()
        if self._credentials is None and (not self._looked_at or
                                          now - self._looked_at > RETRY_EMPTY_S):
            self._looked_at = now
            self._credentials = session.get_credentials()
        return self._credentials


_chain = _Chain()
MAX_CREDENTIALS_FILE = 64 * 1024


class _CredentialsFile:
    """`upstreams.bedrock.aws_credentials_file`: botocore's shared-credentials format
    (a mounted Secret), re-read when its stat changes, like an `api_key_file`
    (upstream_auth/keys.py): a rotation applies on the next request, a file gone
    mid-rotation keeps the last good credentials."""

    def __init__(self, path: str, profile: str) -> None:
        self.path, self.profile = path, profile
        self._signature: tuple[int, ...] | None = None
        self._credentials: Any = None

    def __repr__(self) -> str:
        return f"_CredentialsFile({self.path!r}, profile={self.profile!r})"

    def credentials(self) -> Any:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._credentials
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CREDENTIALS_FILE:
            # A FIFO swapped in would block the event loop on open; a huge file is not ours.
            return self._credentials
        signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if signature != self._signature:
            try:
                found = SharedCredentialProvider(self.path, self.profile).load()
            except Exception:  # noqa: BLE001 - a half-written file: keep the last good
                log.warning("AWS credentials file %s could not be read", self.path)
                return self._credentials
            if found is not None:
                self._signature, self._credentials = signature, found
        return self._credentials


_FILES: dict[tuple[str, str], _CredentialsFile] = {}


def _credentials_for(upstream: Upstream) -> Any:
    if upstream.aws_credentials_file is None:
        return _chain.credentials()
    where = (upstream.aws_credentials_file, upstream.aws_profile or "default")
    found = _FILES.get(where)
    if found is None:
        found = _FILES[where] = _CredentialsFile(*where)
    return found.credentials()


def aws_credentials() -> Any:
    """tether's own AWS credentials (botocore's chain), shared by every signer."""
    return _chain.credentials()


def region_of(upstream: Upstream) -> str:
    if upstream.region:
        return upstream.region
    host = urlsplit(upstream.url).hostname or ""
    m = _REGION.search(host)
    if m:
        return m.group(1)
    return _chain.session().get_config_variable("region") or "us-east-1"


def sign(upstream: Upstream, method: str, url: str, headers: CIMultiDict[str],
         body: bytes) -> CIMultiDict[str]:
    credentials = _credentials_for(upstream)
    if credentials is None and upstream.aws_credentials_file:
        raise CredentialsUnavailable(
            f"tether has no AWS credentials in {upstream.aws_credentials_file} (profile "
            f"{upstream.aws_profile or 'default'}); the request was not forwarded")
    if credentials is None:
        raise UpstreamError("tether has no AWS credentials to sign the Bedrock request "
                            "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role)")
    unsigned = {k: v for k, v in headers.items()
                if k.lower() != "authorization" and not k.lower().startswith("x-amz-")}
    unsigned["Host"] = urlsplit(url).netloc
    request = AWSRequest(method=method, url=url, data=body, headers=unsigned)
    frozen = credentials.get_frozen_credentials()
    SigV4Auth(frozen, SERVICE, region_of(upstream)).add_auth(request)
    return CIMultiDict((k, str(v)) for k, v in request.headers.items())
