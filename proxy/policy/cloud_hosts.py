"""Which cloud API a host name belongs to, matched from the right and anchored.

`ec2.us-east-1.amazonaws.com` is AWS; `amazonaws.com.evil.net` and
`evilamazonaws.com` are not: a suffix matches whole labels only. Names are
compared lower-cased with one trailing dot dropped; anything that is not a
plain LDH name (IP literals, ports, brackets, underscores, empty labels) is no
cloud host. A non-ASCII name that folds (NFKC) into a cloud host is refused,
since a resolver that applies IDNA mapping would send it to the cloud.

Hosts under a cloud domain that serve customers' own content rather than the
cloud's API (`*.elb.amazonaws.com`, EC2 public DNS names, S3 website
endpoints) are not cloud APIs either: the caller treats them as any other host.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from .cloud_catalog import CloudCatalog
from .cloud_common import CannotClassify, Refuse

AWS_SUFFIXES = (("amazonaws", "com", "cn"), ("amazonaws", "com"), ("api", "aws"))
GCP_SUFFIX = ("googleapis", "com")
_LDH = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")
AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)?-[a-z]+-\d{1,2}")
GCP_REGION = re.compile(r"[a-z]+-[a-z]+\d{1,2}")
_S3_LEGACY = re.compile(r"s3-(" + AWS_REGION.pattern + r"|external-1)")
_VPCE = re.compile(r"vpce(-[a-z0-9]+)+")
_IDEOGRAPHIC_DOTS = {0x3002: ".", 0xFF0E: ".", 0xFF61: "."}  # IDNA reads these as label dots
S3_FAMILY = frozenset({"s3", "s3-accelerate", "s3-accesspoint"})
PREFIXED_OK = frozenset({"s3-control", "s3-object-lambda", "s3-outposts"})


@dataclass(frozen=True, slots=True)
class CloudHost:
    cloud: str                # aws | azure | gcp
    service: str | None       # AWS: IAM-style service name; GCP: API name (None: from the path)
    region: str | None = None
    bucket: str | None = None  # S3 virtual-hosted bucket or access point alias


def recognise_host(host: str, catalog: CloudCatalog) -> CloudHost | None:
    """The cloud API behind `host`, or None. Raises CannotClassify or Refuse."""
    name = host[:-1] if host.endswith(".") else host
    if not name.isascii():
        folded = unicodedata.normalize("NFKC", name).translate(_IDEOGRAPHIC_DOTS).casefold().rstrip(".")
        if folded.isascii() and _LDH.fullmatch(folded):
            try:
                look_alike = _match(folded, catalog)
            except CannotClassify as e:
                raise Refuse(f"host {host!r} is a Unicode look-alike of {folded}", e.cloud) from e
            if look_alike is not None:
                raise Refuse(f"host {host!r} is a Unicode look-alike of {folded}", look_alike.cloud)
        return None
    name = name.lower()
    if not _LDH.fullmatch(name) or _is_ip(name):
        return None
    return _match(name, catalog)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _match(name: str, catalog: CloudCatalog) -> CloudHost | None:
    labels = name.split(".")
    for suffix in AWS_SUFFIXES:
        if len(labels) > len(suffix) and tuple(labels[-len(suffix):]) == suffix:
            return _aws(labels[:-len(suffix)], catalog, vpce_ok=suffix[0] == "amazonaws")
    if name in catalog.azure_hosts:
        return CloudHost("azure", None)
    if len(labels) > 2 and tuple(labels[-2:]) == GCP_SUFFIX:
        return _gcp(labels[:-2])
    return None


def _aws(labels: list[str], catalog: CloudCatalog, *, vpce_ok: bool) -> CloudHost | None:
    rest = list(labels)
    vpce = vpce_ok and rest[-1] == "vpce"
    if vpce:
        rest.pop()
    region = rest.pop() if rest and AWS_REGION.fullmatch(rest[-1]) else None
    if rest and rest[-1] == "dualstack":
        rest.pop()
    if not rest:
        return None
    label = rest.pop()
    if vpce:
        rest = [x for x in rest if not _VPCE.fullmatch(x)]
    if label.endswith("-fips"):
        label = label[: -len("-fips")]
    if label.startswith("s3-website"):
        return None  # static website hosting: the customer's content, not the S3 API
    legacy = _S3_LEGACY.fullmatch(label)
    if legacy:
        label, region = "s3", region or ("us-east-1" if legacy.group(1) == "external-1" else legacy.group(1))
    if label.startswith("s3express-"):
        label = "s3"
    if label in S3_FAMILY:
        return CloudHost("aws", "s3", region, ".".join(rest) or None)
    if region is None and rest and AWS_REGION.fullmatch(rest[-1]):
        region = rest.pop()  # legacy region-first names: us-west-1.ec2.amazonaws.com
    endpoint = ".".join([*rest, label])
    if endpoint in catalog.aws_aliases:
        return CloudHost("aws", catalog.aws_aliases[endpoint], region)
    if rest:
        if label in catalog.aws_customer:
            return None
        if label in PREFIXED_OK:
            return CloudHost("aws", label, region)
        raise CannotClassify(f"AWS host form {'.'.join(labels)!r} is not one tether knows", endpoint, "aws")
    return CloudHost("aws", label, region)


def _gcp(labels: list[str]) -> CloudHost:
    if labels == ["www"]:
        return CloudHost("gcp", None)
    if len(labels) == 2 and labels[1] == "mtls":
        labels = labels[:1]
    if len(labels) == 3 and labels[2] == "rep" and GCP_REGION.fullmatch(labels[1]):
        return CloudHost("gcp", labels[0], labels[1])
    if len(labels) != 1:
        raise CannotClassify(f"Google API host form {'.'.join(labels)}.googleapis.com is not one tether "
                             "knows (the GCS XML API is not classified)", labels[-1], "gcp")
    label = labels[0]
    m = re.fullmatch(r"(" + GCP_REGION.pattern + r")-([a-z][a-z0-9-]*)", label)
    if m:
        return CloudHost("gcp", m.group(2), m.group(1))
    return CloudHost("gcp", label)
