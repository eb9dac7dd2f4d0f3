"""A fake of the Google Cloud APIs tether's GCP label lookups meet, on one TLS port.

- GCE (`compute/v1`): disks, instances, snapshots and images with `labels` (omitted
  when empty, as GCE does) and a `labelFingerprint`; DELETE answers an Operation
  (`RUNNING`), which `zoneOperations.get` moves to `DONE` on the next poll and `wait`
  at once; `setLabels` checks the fingerprint (412 when stale) as GCE does.
- Cloud Storage (`storage/v1/b/{bucket}`): buckets with `labels`; DELETE is 204.
- GKE (`v1/projects/p/locations/l/clusters/c`): clusters with `resourceLabels`; DELETE
  answers a GKE Operation (`DELETE_CLUSTER`, `RUNNING`) and leaves the cluster `STOPPING`;
  `operations.get` moves it to `DONE` on the next poll, and the cluster is gone then.
- Google's OAuth token endpoint (`/token`): the JWT-bearer grant of a service-account
  key file, its RS256 signature checked against the key's public half.

Errors are GCP's JSON (`{"error": {"code", "message", "errors", "status"}}`). Every
request needs a bearer token: the agent's (`AGENT_TOKEN`) or one `/token` issued;
requests with an issued token are tether's lookups (`lookups`), the others the
agent's (`seen`). `lookup_status`, `lookup_delay` and `lookup_body` make tether's
lookups fail, as IAM, a slow API or a broken answer would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

AGENT_TOKEN = "agent-token-from-its-own-identity"
READ_ONLY = "https://www.googleapis.com/auth/cloud-platform.read-only"
SA_EMAIL = "tether-reader@proj-1.iam.gserviceaccount.com"
GRANT_AUDIENCE = "https://oauth2.googleapis.com/token"  # what Google's endpoint requires, wherever it is
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
          404: "NOT_FOUND", 412: "FAILED_PRECONDITION", 500: "INTERNAL"}
REASON = {400: "invalid", 401: "required", 403: "forbidden", 404: "notFound",
          412: "conditionNotMet", 500: "backendError"}


def gcp_error(status: int, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": REASON.get(status, "error")}],
        "status": STATUS.get(status, "UNKNOWN")}}
    return web.json_response(body, status=status)


def fingerprint(labels: dict[str, str]) -> str:
    return base64.b64encode(hashlib.sha256(json.dumps(labels, sort_keys=True).encode())
                            .digest()[:8]).decode()


def disk(project: str, zone: str, name: str, labels: dict[str, str]) -> tuple[str, dict[str, Any]]:
    path = f"compute/v1/projects/{project}/zones/{zone}/disks/{name}"
    number = int(hashlib.sha256(path.encode()).hexdigest()[:15], 16)
    return path, {"kind": "compute#disk", "id": str(number),
                  "name": name, "sizeGb": "10", "status": "READY", "type": "pd-standard",
                  "labels": labels, "labelFingerprint": fingerprint(labels),
                  "zone": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}",
                  "selfLink": f"https://www.googleapis.com/{path}"}


def bucket(name: str, labels: dict[str, str]) -> tuple[str, dict[str, Any]]:
    return f"storage/v1/b/{name}", {"kind": "storage#bucket", "id": name, "name": name,
                                     "location": "US", "storageClass": "STANDARD",
                                     "labels": labels, "projectNumber": "1234"}


def cluster(project: str, location: str, name: str,
            labels: dict[str, str]) -> tuple[str, dict[str, Any]]:
    path = f"v1/projects/{project}/locations/{location}/clusters/{name}"
    return path, {"name": name, "location": location, "status": "RUNNING",
                  "resourceLabels": labels, "labelFingerprint": fingerprint(labels)[:8],
                  "selfLink": f"https://container.googleapis.com/{path}"}


def default_resources() -> dict[str, dict[str, Any]]:
    return dict([
        disk("proj-1", "us-central1-a", "prod-disk", {"env": "production"}),
        disk("proj-1", "us-central1-a", "cand-disk", {"env": "production-candidate", "owner": "ml"}),
        disk("proj-1", "us-central1-a", "scratch-disk", {"env": "temporary"}),
        disk("proj-1", "us-central1-a", "bare-disk", {}),
        bucket("prod-bucket", {"env": "production"}),
        bucket("tmp-bucket", {"env": "temporary"}),
        cluster("proj-1", "europe-west1", "prod-gke", {"env": "production"}),
        cluster("proj-1", "europe-west1", "tmp-gke", {"env": "temporary"}),
    ])


@dataclass
class Seen:
    method: str
    path: str
    host: str
    token: str


@dataclass
class FakeGoogle:
    sa_key: rsa.RSAPrivateKey
    token_uri: str = ""  # set once the port is known: where the key file sends grants
    resources: dict[str, dict[str, Any]] = field(default_factory=default_resources)
    seen: list[Seen] = field(default_factory=list)
    lookups: list[Seen] = field(default_factory=list)
    grants: list[dict[str, Any]] = field(default_factory=list)
    lookup_status: int = 200
    lookup_delay: float = 0.0
    lookup_body: bytes | None = None
    _issued: set[str] = field(default_factory=set)
    _operations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def key_file(self) -> dict[str, str]:
        """The service-account key file tether is given (GOOGLE_APPLICATION_CREDENTIALS)."""
        pem = self.sa_key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": "proj-1", "private_key_id": "k1",
                "private_key": pem, "client_email": SA_EMAIL, "client_id": "1001",
                "token_uri": self.token_uri}

    def relabel(self, path: str, labels: dict[str, str]) -> None:
        """Another actor (a person, a pipeline) changes a resource's labels."""
        field_name = "resourceLabels" if path.startswith("v1/") else "labels"
        self.resources[path][field_name] = labels
        self.resources[path]["labelFingerprint"] = fingerprint(labels)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app

    async def token(self, request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        try:
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            claims = jwt.decode(form["assertion"][0], self.sa_key.public_key(), algorithms=["RS256"],
                                audience=GRANT_AUDIENCE, issuer=SA_EMAIL)
        except (KeyError, AssertionError, jwt.PyJWTError) as e:
            return web.json_response({"error": "invalid_grant", "error_description": str(e)},
                                     status=400)
        self.grants.append(claims)
        token = f"tether-token-{len(self.grants)}"
        self._issued.add(token)
        return web.json_response({"access_token": token, "expires_in": 3600,
                                  "token_type": "Bearer"})

    async def api(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        path = request.path.lstrip("/")
        seen = Seen(request.method, path, request.host.rsplit(":", 1)[0], token)
        if token in self._issued:
            self.lookups.append(seen)
            await asyncio.sleep(self.lookup_delay)
            if self.lookup_status != 200:
                return gcp_error(self.lookup_status, f"Required '{_permission(path)}' permission "
                                 f"for '{path}'")
            if self.lookup_body is not None:
                return web.Response(body=self.lookup_body, content_type="application/json")
        elif token == AGENT_TOKEN:
            self.seen.append(seen)
        else:
            return gcp_error(401, "Request is missing required authentication credential.")
        return self.serve(request.method, path, await request.read())

    def serve(self, method: str, path: str, body: bytes) -> web.Response:
        parts = path.split("/")
        if "operations" in parts[-3:]:
            return self.operation(method, parts)
        verb = None
        if path not in self.resources and parts[-1] == "setLabels":
            path, verb = "/".join(parts[:-1]), "setLabels"
        resource = self.resources.get(path)
        if resource is None:
            what = "bucket" if path.startswith("storage/") else f"resource '{path}'"
            return gcp_error(404, f"The {what} was not found")
        if method == "GET" and verb is None:
            shown = {k: v for k, v in resource.items() if not (k.endswith("abels") and not v)}
            return web.json_response(shown)
        if method == "DELETE" and verb is None:
            if path.startswith("v1/"):  # GKE: the cluster stops, and is gone when that is DONE
                resource["status"] = "STOPPING"
                return web.json_response(self.start_gke("DELETE_CLUSTER", path))
            del self.resources[path]
            if path.startswith("storage/"):
                return web.Response(status=204)
            return web.json_response(self.start("delete", path))
        if method == "POST" and verb == "setLabels":
            asked = json.loads(body)
            if asked.get("labelFingerprint") != resource.get("labelFingerprint"):
                return gcp_error(412, "Labels fingerprint either invalid or resource labels have "
                                 "changed")
            self.relabel(path, dict(asked.get("labels") or {}))
            return web.json_response(self.start("setLabels", path, done=True))
        return gcp_error(400, f"{method} {path} is not supported by this fake")

    def start(self, kind: str, target: str, done: bool = False) -> dict[str, Any]:
        """A zonal GCE Operation on `target`: RUNNING, DONE on its next poll."""
        scope = "/".join(target.split("/")[:6])  # compute/v1/projects/p/zones/z
        name = f"operation-{len(self._operations) + 1}-{int(time.time())}"
        op = {"kind": "compute#operation", "id": str(len(self._operations) + 1), "name": name,
              "operationType": kind, "targetLink": f"https://www.googleapis.com/{target}",
              "status": "DONE" if done else "RUNNING", "progress": 100 if done else 0,
              "insertTime": "2026-12-07T16:00:00.000-00:00",
              "zone": f"https://www.googleapis.com/{scope}",
              "selfLink": f"https://www.googleapis.com/{scope}/operations/{name}"}
        self._operations[name] = op
        return op

    def start_gke(self, kind: str, target: str) -> dict[str, Any]:
        """A GKE Operation (container/v1, not a compute#operation) on cluster `target`."""
        scope = "/".join(target.split("/")[:5])  # v1/projects/p/locations/l
        name = f"operation-{int(time.time() * 1000)}-{len(self._operations) + 1:08x}"
        op = {"name": name, "zone": target.split("/")[4], "operationType": kind,
              "status": "RUNNING", "selfLink": f"https://container.googleapis.com/{scope}/operations/{name}",
              "targetLink": f"https://container.googleapis.com/{target}",
              "location": target.split("/")[4], "startTime": "2026-12-07T16:00:00.000000000Z"}
        self._operations[name] = op
        return op

    def operation(self, method: str, parts: list[str]) -> web.Response:
        wait = parts[-1] == "wait"
        name = parts[-2] if wait else parts[-1]
        op = self._operations.get(name)
        gke = parts[0] == "v1"
        if op is None or (method, wait) not in (("GET", False), ("POST", True)) or (gke and wait):
            return gcp_error(404, f"The resource 'operations/{name}' was not found")
        if gke:
            if op["status"] == "RUNNING" and op.get("polled"):
                op.update(status="DONE", endTime="2026-12-07T16:00:01.000000000Z")
                self.resources.pop(op["targetLink"].split("/", 3)[3], None)
            op["polled"] = True
            return web.json_response({k: v for k, v in op.items() if k != "polled"})
        if op["status"] == "RUNNING" and op.get("polled"):
            op.update(status="DONE", progress=100, endTime="2026-12-07T16:00:01.000-00:00")
        op["polled"] = True
        if wait:
            op.update(status="DONE", progress=100)
        return web.json_response({k: v for k, v in op.items() if k != "polled"})


def _permission(path: str) -> str:
    parts = path.split("/")
    if path.startswith("storage/"):
        return "storage.buckets.get"
    if path.startswith("v1/"):
        return "container.clusters.get"
    return f"compute.{parts[-2]}.get"
