"""SigV4 for Bedrock: tether signs the upstream request with its own AWS credentials.

The agent's signature cannot survive a rewrite (and the agent should not hold
real AWS keys), so its `Authorization` and `X-Amz-*` headers are dropped and the
request is signed anew with botocore's signer. Credentials come from botocore's
usual chain (environment, shared config, container or instance role), resolved
at each signing so rotated credentials are picked up.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.session import Session
from multidict import CIMultiDict

from ..config import Upstream
from ..errors import UpstreamError

_session = Session()
_REGION = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com$")
SERVICE = "bedrock"


def region_of(upstream: Upstream) -> str:
    if upstream.region:
        return upstream.region
    host = urlsplit(upstream.url).hostname or ""
    m = _REGION.search(host)
    if m:
        return m.group(1)
    return _session.get_config_variable("region") or "us-east-1"


def sign(upstream: Upstream, method: str, url: str, headers: CIMultiDict[str],
         body: bytes) -> CIMultiDict[str]:
    credentials = _session.get_credentials()
    if credentials is None:
        raise UpstreamError("tether has no AWS credentials to sign the Bedrock request "
                            "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role)")
    unsigned = {k: v for k, v in headers.items()
                if k.lower() != "authorization" and not k.lower().startswith("x-amz-")}
    unsigned["Host"] = urlsplit(url).netloc
    request = AWSRequest(method=method, url=url, data=body, headers=unsigned)
    SigV4Auth(credentials.get_frozen_credentials(), SERVICE, region_of(upstream)).add_auth(request)
    return CIMultiDict((k, str(v)) for k, v in request.headers.items())
