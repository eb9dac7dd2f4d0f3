"""AWS lookups (`cloud.lookups.aws.tags`): the tags of the EC2 resources a call names.

Before an EC2 call that names resources (`VolumeId`, `InstanceId`, `SnapshotId`,
`ImageId`, one or a list) is judged, tether asks the same regional endpoint the
agent called for `DescribeTags` (filter `resource-id`), signed with tether's own
AWS credentials (botocore's chain, as for Bedrock; service `ec2`; the permission
`ec2:DescribeTags`), over TLS with the forward proxy's upstream trust
(`forward.upstream_ca`, else certifi) and to the address the SSRF checks passed.
Rules see the answer as `args.Tags` (lookups.py). A lookup that cannot be made or
answered (no credentials, not HTTPS, timeout, non-200, unreadable XML, too many
pages) raises `LookupFailed`. Lookups are made only for calls that name
resources; one short-lived HTTP session per lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from urllib.parse import urlencode
from xml.etree import ElementTree

import aiohttp
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError

from ..model import HttpRequest
from ..policy.cloud import CloudOperation
from ..policy.names import normalize
from ..upstream_auth.sigv4 import aws_credentials
from .lookup_settings import LookupSettings
from .lookups import LookupFailed, pinned_session, read_limited, with_tags

RESOURCE_KEYS = ("VolumeId", "InstanceId", "SnapshotId", "ImageId")
EC2_VERSION = "2016-11-15"
IDS_PER_REQUEST = 100
MAX_PAGES = 20
_WANTED = {normalize(k) for k in RESOURCE_KEYS}


def resource_ids(arguments: Mapping[str, object]) -> list[str]:
    """The resources a call names, in order, once each. Keys are matched in normal
    form (as rules read them); a value that is neither an id nor a list of ids fails."""
    ids: list[str] = []
    for key, value in arguments.items():
        if normalize(key) not in _WANTED:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str) or not v.strip():
                raise LookupFailed(f"{key} is not a resource id or a list of them")
            if v not in ids:
                ids.append(v)
    return ids


def describe_tags_body(ids: Sequence[str], next_token: str | None = None) -> bytes:
    pairs = [("Action", "DescribeTags"), ("Version", EC2_VERSION),
             ("Filter.1.Name", "resource-id")]
    pairs += [(f"Filter.1.Value.{i}", rid) for i, rid in enumerate(ids, 1)]
    pairs.append(("MaxResults", "1000"))
    if next_token:
        pairs.append(("NextToken", next_token))
    return urlencode(pairs).encode()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(node: ElementTree.Element, name: str) -> ElementTree.Element | None:
    return next((c for c in node if _local(c.tag) == name), None)


def parse_describe_tags(body: bytes) -> tuple[list[tuple[str, str, str]], str | None]:
    """(resource id, key, value) triples and the next page's token, from EC2's XML."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise LookupFailed("the DescribeTags answer declares a DTD")
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise LookupFailed(f"the DescribeTags answer is not XML ({e})") from None
    if _local(root.tag) != "DescribeTagsResponse":
        raise LookupFailed(f"the DescribeTags answer is a {_local(root.tag)}")
    tag_set = _child(root, "tagSet")
    if tag_set is None:
        raise LookupFailed("the DescribeTags answer has no tagSet")
    found: list[tuple[str, str, str]] = []
    for item in tag_set:
        rid, key, value = (_child(item, n) for n in ("resourceId", "key", "value"))
        if _local(item.tag) != "item" or rid is None or key is None or not rid.text or not key.text:
            raise LookupFailed("a DescribeTags item lacks resourceId or key")
        found.append((rid.text, key.text, (value.text or "") if value is not None else ""))
    token = _child(root, "nextToken")
    return found, (token.text or None) if token is not None else None


class AwsTagLookup:
    def __init__(self, settings: LookupSettings, upstream_ca: str | None) -> None:
        self.settings = settings
        self.upstream_ca = upstream_ca

    def wanted(self, found: CloudOperation) -> list[str]:
        """The resource ids to look up for `found` (none: judge it as it is)."""
        if not self.settings.aws_tags or found.cloud != "aws" or found.service != "ec2":
            return []
        return resource_ids(found.arguments)

    async def tags(self, found: CloudOperation, http: HttpRequest, ids: Sequence[str],
                   address: str) -> dict[str, object]:
        """`found`'s arguments with the tags of `ids`, asked of `http`'s host at `address`."""
        if http.scheme != "https":
            raise LookupFailed("tether looks tags up over HTTPS only; the call was plain HTTP")
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                tags = await self._fetch(found.region or "us-east-1", http, ids, address)
        except TimeoutError:
            raise LookupFailed(f"DescribeTags timed out after {self.settings.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError, BotoCoreError) as e:
            raise LookupFailed(f"DescribeTags failed: {type(e).__name__}: {e}") from None
        return with_tags(found.arguments, ids, tags)

    async def _fetch(self, region: str, http: HttpRequest, ids: Sequence[str],
                     address: str) -> dict[str, dict[str, str]]:
        netloc = http.host if http.port == 443 else f"{http.host}:{http.port}"
        url = f"https://{netloc}/"
        tags: dict[str, dict[str, str]] = {}
        async with pinned_session(address, self.upstream_ca) as session:
            for start in range(0, len(ids), IDS_PER_REQUEST):
                chunk = ids[start:start + IDS_PER_REQUEST]
                token: str | None = None
                for _page in range(MAX_PAGES):
                    body = describe_tags_body(chunk, token)
                    headers = _signed(region, url, netloc, body)
                    async with session.post(url, data=body, headers=headers,
                                            allow_redirects=False) as resp:
                        text = await read_limited(resp, "DescribeTags")
                        if resp.status != 200:
                            raise LookupFailed(f"DescribeTags answered HTTP {resp.status}")
                    found, token = parse_describe_tags(text)
                    for rid, key, value in found:
                        if rid in chunk:
                            tags.setdefault(rid, {})[key] = value
                    if token is None:
                        break
                else:
                    raise LookupFailed(f"DescribeTags had more than {MAX_PAGES} pages")
        return tags


def _signed(region: str, url: str, netloc: str, body: bytes) -> dict[str, str]:
    """SigV4 with tether's own credentials (never the agent's, which tether drops)."""
    credentials = aws_credentials()
    if credentials is None:
        raise LookupFailed("tether has no AWS credentials to look tags up with "
                           "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role)")
    headers = {"Host": netloc, "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(credentials.get_frozen_credentials(), "ec2", region).add_auth(request)
    return {k: str(v) for k, v in request.headers.items()}
