"""Cloud API requests without a usable spec, named and judged: the classifier's front door.

`classify(request)` takes one outgoing `HttpRequest` and answers:

  None             not a cloud API host: the caller applies its other checks
                   (an `apis:` entry, or its default for unknown hosts)
  CloudOperation   the operation (`aws.ec2.DeleteVolume`), its effect, its arguments
  Unclassified     a cloud API host, but no operation could be named: count it
                   as an unknown write (tether denies these unless told otherwise)
  Refused          ambiguous or malformed: deny, never guess

Method overrides (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`,
`_method`) are judged as the method they ask for, but only on a POST, the one
method clients tunnel others through: on any other method an override that
differs refuses (a DELETE dressed as a GET must not pass as a read on a server
that ignores the header). And when the plain POST is itself an operation other
than the overridden one (POST `listKeys` with `X-HTTP-Method-Override: GET`),
the request refuses too: the server may do either.

It is sans-IO and synchronous: the mitmproxy addon and the `/apis/` route call
it the same way. The catalog it consults is compiled once (`builtin_catalog()`,
plus `CloudCatalog.with_overrides(...)` for a config's effect overrides).
Request paths and queries are expected raw (percent-encoded) and already
through the canonical-request checks; the classifier still decodes strictly and
refuses what it cannot read one way only.
"""

from __future__ import annotations

from ..model import HttpRequest
from .cloud_aws import classify_aws
from .cloud_azure import classify_azure
from .cloud_catalog import CloudCatalog, builtin_catalog, load_catalog
from .cloud_common import (
    METHODS,
    CannotClassify,
    Classification,
    CloudOperation,
    Draft,
    Refuse,
    Refused,
    Unclassified,
    check_header_names,
    method_override,
)
from .cloud_gcp import classify_gcp
from .cloud_hosts import CloudHost, recognise_host

__all__ = [
    "Classification", "CloudCatalog", "CloudHost", "CloudOperation", "Refused", "Unclassified",
    "builtin_catalog", "classify", "cloud_host", "load_catalog",
]


def cloud_host(host: str, catalog: CloudCatalog | None = None) -> CloudHost | Unclassified | Refused | None:
    """Only the host part: which cloud API, if any, `host` belongs to."""
    catalog = catalog or builtin_catalog()
    try:
        return recognise_host(host, catalog)
    except Refuse as e:
        return Refused(e.cloud or "unknown", e.reason)
    except CannotClassify as e:
        return Unclassified(e.cloud or "unknown", e.service, None, e.reason)


def classify(request: HttpRequest, catalog: CloudCatalog | None = None) -> Classification | None:
    """The cloud operation `request` performs, or why it has none; None if not a cloud API."""
    catalog = catalog or builtin_catalog()
    found = cloud_host(request.host, catalog)
    if not isinstance(found, CloudHost):
        return found
    try:
        check_header_names(request)
        real, override = request.method.upper(), method_override(request)
        if override is None or override == real:
            draft = _classify(request, found, catalog, real)
        elif real != "POST":
            raise Refuse(f"a {real} request overridden to {override}: only POST may carry another method")
        else:
            draft = _classify(request, found, catalog, override)
            try:  # what a server that ignores the override does; ambiguous there refuses too
                plain: Draft | None = _classify(request, found, catalog, real)
            except CannotClassify:
                plain = None
            if plain is not None and plain.operation != draft.operation:
                raise Refuse(f"this POST is {plain.operation}, or {draft.operation} if the server "
                             f"honours the {override} override")
    except Refuse as e:
        return Refused(found.cloud, e.reason)
    except CannotClassify as e:
        return Unclassified(found.cloud, e.service or found.service, found.region, e.reason)
    return catalog.judge(draft)


def _classify(request: HttpRequest, host: CloudHost, catalog: CloudCatalog, method: str) -> Draft:
    if method not in METHODS:
        raise CannotClassify(f"method {method!r} is not one tether classifies")
    if host.cloud == "aws":
        return classify_aws(request, host, catalog, method)
    if host.cloud == "azure":
        return classify_azure(request, catalog, method)
    return classify_gcp(request, host, catalog, method)
