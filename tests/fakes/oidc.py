"""A fake OIDC issuer on loopback: discovery document, JWKS, and a token minter.

Keys are real (RSA 2048 and EC P-256, made with cryptography); tokens are real
JWS compact tokens. `mint` makes good ones and, with its arguments, every kind
of bad one the verifier must refuse; `alg_none` and `hs_confused` forge the two
classic attacks by hand, since no honest library signs them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

type PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key(kind: str = "RSA") -> PrivateKey:
    if kind == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: PrivateKey, kid: str, alg: str | None = None) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig"})
    if alg:
        jwk["alg"] = alg
    return jwk


@dataclass
class FakeIssuer:
    """`issuer` is the `iss` it signs; `url` (set by `serve`) is where it is reached.
    With `token` set, the JWKS answers 401 unless that bearer token is sent (the
    Kubernetes API server's /openid/v1/jwks)."""

    issuer: str = ""
    url: str = ""
    keys: dict[str, tuple[PrivateKey, str]] = field(default_factory=dict)  # kid -> (key, alg)
    published: list[str] = field(default_factory=list)
    token: str | None = None
    down: bool = False
    jwks_hits: int = 0
    discovery_hits: int = 0
    seen_auth: list[str | None] = field(default_factory=list)
    runner: web.AppRunner | None = None

    def add_key(self, kid: str, kind: str = "RSA", publish: bool = True) -> PrivateKey:
        key = new_key(kind)
        self.keys[kid] = (key, "ES256" if kind == "EC" else "RS256")
        if publish:
            self.published.append(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.keys[k][0], k, self.keys[k][1]) for k in self.published]}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        return app

    async def serve(self) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.issuer = self.issuer or self.url

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        if self.down:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.url}/jwks",
                                  "id_token_signing_alg_values_supported": ["RS256", "ES256"]})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        self.seen_auth.append(request.headers.get("Authorization"))
        if self.down:
            return web.json_response({"error": "down"}, status=503)
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        return web.json_response(self.jwks())

    # -- tokens -----------------------------------------------------------------------------

    def claims(self, sub: str, aud: str | list[str] = "tether", ttl: int = 600,
               **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {"iss": self.issuer, "sub": sub, "aud": aud, "iat": now, "nbf": now,
                "exp": now + ttl, "jti": uuid.uuid4().hex, **extra}

    def mint(self, sub: str = "db-agent", *, kid: str | None = None, aud: str | list[str] = "tether",
             ttl: int = 600, headers: dict[str, Any] | None = None,
             payload: dict[str, Any] | None = None, **extra: Any) -> str:
        """A signed token; `payload` replaces the claims whole (`iss`, times and all)."""
        kid = kid or next(iter(self.keys))
        key, alg = self.keys[kid]
        body = payload if payload is not None else self.claims(sub, aud, ttl, **extra)
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid, **(headers or {})})

    def k8s(self, namespace: str, account: str, aud: str = "tether", kid: str | None = None) -> str:
        """A projected service-account token as the API server mints it."""
        body = self.claims(f"system:serviceaccount:{namespace}:{account}", [aud], ttl=3600)
        body["kubernetes.io"] = {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": str(uuid.uuid4())},
            "pod": {"name": f"{account}-7d9f8", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
        }
        return self.mint(kid=kid, payload=body)

    def alg_none(self, sub: str = "db-agent") -> str:
        head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": next(iter(self.keys))}).encode())
        return f"{head}.{_b64(json.dumps(self.claims(sub)).encode())}."

    def hs_confused(self, sub: str = "db-agent", kid: str | None = None) -> str:
        """HS256, keyed with the RSA public key's PEM: valid if a verifier lets the
        token's alg pick how the published key is used."""
        kid = kid or next(iter(self.keys))
        pem = self.keys[kid][0].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        body = _b64(json.dumps(self.claims(sub)).encode())
        sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64(sig)}"
