"""A fake Azure Resource Manager (managed disks, the Tags API, async operations) and a
fake Microsoft Entra ID token endpoint, speaking their wire formats.

ARM, as azure-mgmt-compute and tether meet it (and `tether demo --cloud azure`):
- `GET /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/disks`: the
  group's disks (`{"value": [...]}`, tags on each, as Disks - List By Resource Group);
- `GET|PUT|DELETE /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/disks/{d}`:
  the disk (its `tags` as ARM serves them, on the resource) or 404; PUT creates or
  updates it (200 with the resource, which the disks API allows); DELETE answers 202 with
  `Azure-AsyncOperation` and `Location` (the disk is gone when polling ends);
- `GET .../locations/{loc}/DiskOperations/{id}`: the operation's status, `InProgress`
  on the first poll and `Succeeded` after;
- `GET {scope}/providers/Microsoft.Resources/tags/default`: the Tags API for a disk,
  a resource group or a subscription (`{"id", "name", "type", "properties": {"tags"}}`);
- errors in ARM's shape, `{"error": {"code", "message"}}`; every request needs a
  bearer token, and api-version.

Entra ID: `POST /{tenant}/oauth2/v2.0/token` (client credentials with a secret), as
azure-identity's ClientSecretCredential asks it.

`seen` records the agent's requests, `lookups` the Tags API's (tether's), `tokens`
the token requests; `tags_status` / `tags_delay` make the Tags API fail or stall.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass, field

from aiohttp import web

SUB = "00000000-0000-0000-0000-00000000abcd"
TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID, CLIENT_SECRET = "tether-reader", "tether-reader-secret"
DISK = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute"
                  r"/disks/([^/]+)", re.IGNORECASE)
DISKS = re.compile(r"/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute"
                   r"/disks", re.IGNORECASE)
OPERATION = re.compile(r"/subscriptions/[^/]+/providers/Microsoft\.Compute/locations/[^/]+"
                       r"/DiskOperations/([^/]+)", re.IGNORECASE)
TAGS_API = "/providers/Microsoft.Resources/tags/default"


def arm_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def default_disks() -> dict[str, dict[str, str]]:
    return {"disk-prod": {"env": "production"},
            "disk-cand": {"env": "production-candidate", "owner": "ml"},
            "disk-tmp": {"env": "temporary"}, "disk-bare": {}}


@dataclass
class FakeArm:
    disks: dict[str, dict[str, str]] = field(default_factory=default_disks)
    group_tags: dict[str, dict[str, str]] = field(default_factory=lambda: {"rg-ops": {"tier": "ops"}})
    subscription_tags: dict[str, str] = field(default_factory=lambda: {"billing": "ml"})
    seen: list[dict[str, str]] = field(default_factory=list)
    lookups: list[dict[str, str]] = field(default_factory=list)
    polls: int = 0
    tags_status: int = 200
    tags_delay: float = 0.0
    location: str = "westeurope"
    operations: dict[str, int] = field(default_factory=dict)   # id -> polls so far
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        record = {"method": request.method, "path": request.path, "query": request.query_string,
                  "authorization": request.headers.get("authorization", ""),
                  "host": request.headers.get("host", "")}
        if not record["authorization"].startswith("Bearer "):
            return arm_error(401, "AuthenticationFailed", "Authentication failed. The "
                             "'Authorization' header is missing.")
        if "api-version" not in request.query:
            return arm_error(400, "MissingApiVersionParameter", "The api-version query "
                             "parameter (?api-version=) is required for all requests.")
        if request.path.endswith(TAGS_API):
            self.lookups.append(record)
            return await self.tags(request.path[:-len(TAGS_API)])
        self.seen.append(record)
        if (m := OPERATION.fullmatch(request.path)) and request.method == "GET":
            return self.operation(m.group(1))
        if (m := DISKS.fullmatch(request.path)) and request.method == "GET":
            return web.json_response({"value": [self.disk(m.group(1), m.group(2), name)
                                                for name in self.disks]})
        m = DISK.fullmatch(request.path)
        if m is None:
            return arm_error(404, "InvalidResourceType", f"no route for {request.path}")
        name = m.group(3)
        if request.method == "PUT":  # create or update; ARM answers with the resource
            body = await request.json()
            self.disks[name] = dict(body.get("tags") or {})
            return web.json_response(self.disk(m.group(1), m.group(2), name))
        if name not in self.disks:
            return arm_error(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/disks/"
                             f"{name}' under resource group '{m.group(2)}' was not found.")
        if request.method == "GET":
            return web.json_response(self.disk(m.group(1), m.group(2), name))
        if request.method == "DELETE":
            op = f"op-{next(self._ids)}"
            self.operations[op] = 0
            del self.disks[name]
            base = f"https://{request.host}/subscriptions/{m.group(1)}/providers/Microsoft.Compute/" \
                   f"locations/{self.location}"
            return web.Response(status=202, headers={
                "Azure-AsyncOperation": f"{base}/DiskOperations/{op}?p=x&api-version=2026-03-02",
                "Location": f"{base}/DiskOperations/{op}?p=x&monitor=true&api-version=2026-03-02",
                "Retry-After": "0"})
        return arm_error(405, "MethodNotAllowed", f"{request.method} is not supported here")

    def disk(self, sub: str, group: str, name: str) -> dict[str, object]:
        return {"id": f"/subscriptions/{sub}/resourceGroups/{group}/providers/Microsoft.Compute/"
                      f"disks/{name}",
                "name": name, "type": "Microsoft.Compute/disks", "location": self.location,
                "tags": self.disks[name], "sku": {"name": "Standard_LRS"},
                "properties": {"diskSizeGB": 8, "diskState": "Unattached",
                               "provisioningState": "Succeeded"}}

    def operation(self, op: str) -> web.Response:
        if op not in self.operations:
            return arm_error(404, "NotFound", f"operation {op} not found")
        self.polls += 1
        self.operations[op] += 1
        status = "InProgress" if self.operations[op] == 1 else "Succeeded"
        return web.json_response({"name": op, "status": status,
                                  "startTime": "2026-12-07T17:00:00Z"},
                                 headers={"Retry-After": "0"})

    async def tags(self, scope: str) -> web.Response:
        await asyncio.sleep(self.tags_delay)
        if self.tags_status == 403:
            return arm_error(403, "AuthorizationFailed", "The client does not have "
                             "authorization to perform action 'Microsoft.Resources/tags/read'.")
        if self.tags_status != 200:
            return arm_error(self.tags_status, "InternalServerError", "try again later")
        if m := DISK.fullmatch(scope):
            if m.group(3) not in self.disks:
                return arm_error(404, "ResourceNotFound", f"disk {m.group(3)} was not found")
            tags = self.disks[m.group(3)]
        elif m := re.fullmatch(r"/subscriptions/[^/]+/resourceGroups/([^/]+)", scope, re.I):
            tags = self.group_tags.get(m.group(1), {})
        elif re.fullmatch(r"/subscriptions/[^/]+", scope):
            tags = self.subscription_tags
        else:
            return arm_error(400, "InvalidScope", f"{scope} is not a scope tags can be read at")
        return web.json_response({"id": f"{scope}{TAGS_API}", "name": "default",
                                  "type": "Microsoft.Resources/tags",
                                  "properties": {"tags": dict(tags)} if tags else {}})


@dataclass
class FakeEntra:
    """Client credentials with a secret; each token names its grant (`tether-token-N`)."""

    tokens: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.tokens.append({"tenant": request.match_info["tenant"], **form})
        if (request.match_info["tenant"] != TENANT or form.get("client_id") != CLIENT_ID
                or form.get("client_secret") != CLIENT_SECRET
                or form.get("grant_type") != "client_credentials"):
            return web.json_response({"error": "invalid_client", "error_description":
                                      "AADSTS7000215: Invalid client secret provided."},
                                     status=401)
        return web.json_response({"token_type": "Bearer", "expires_in": 3599,
                                  "ext_expires_in": 3599,
                                  "access_token": f"tether-token-{len(self.tokens)}"})
