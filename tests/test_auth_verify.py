"""The sans-IO verifier, key sets, credential finding and the authenticator, without sockets."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from proxy.auth.authenticator import Authenticator, JwksUnavailable
from proxy.auth.credentials import find, from_proxy_authorization, strip_query
from proxy.auth.jwks import KeyCache, KeySetError, parse_jwks
from proxy.auth.settings import AuthSettings, JwtIssuer, Mode
from proxy.auth.verify import claim_at, identity, peek, verify
from proxy.errors import Unauthorized
from tests.fakes.oidc import K8S_ISSUER, FakeIssuer, public_jwk

ISS = "https://issuer.example"


@pytest.fixture(scope="module")
def issuer() -> FakeIssuer:
    fake = FakeIssuer(issuer=ISS, url=ISS)
    fake.add_key("rsa-1")
    fake.add_key("ec-1", kind="EC")
    return fake


def cfg(**kw: Any) -> JwtIssuer:
    return JwtIssuer(**{"issuer": ISS, "audiences": ("tether",), **kw})


def check(fake: FakeIssuer, token: str, now: float | None = None, **kw: Any) -> dict[str, object]:
    peeked = peek(token)
    assert peeked is not None
    return verify(token, peeked, cfg(**kw), parse_jwks(fake.jwks()), now or time.time())


def reason(fake: FakeIssuer, token: str, **kw: Any) -> str:
    with pytest.raises(Unauthorized) as info:
        check(fake, token, **kw)
    return info.value.reason


def test_good_tokens_verify(issuer: FakeIssuer) -> None:
    assert check(issuer, issuer.mint("a", kid="rsa-1"))["sub"] == "a"
    assert check(issuer, issuer.mint("b", kid="ec-1"))["sub"] == "b"
    assert check(issuer, issuer.mint("c", aud=["x", "tether"]))["sub"] == "c"


@pytest.mark.parametrize(("kind", "expected"), [
    ("expired", "expired"), ("audience", "audience"), ("none", "algorithm"),
    ("hs", "algorithm"), ("signature", "signature"), ("issuer", "issuer"),
    ("no-exp", "malformed"), ("future-iat", "not_yet_valid"), ("kid-wrong-type", "algorithm"),
])
def test_bad_tokens_fail_with_their_reason(issuer: FakeIssuer, kind: str, expected: str) -> None:
    claims = issuer.claims("a")
    makers: dict[str, Callable[[], str]] = {
        "expired": lambda: issuer.mint(ttl=-31),
        "audience": lambda: issuer.mint(aud="other"),
        "none": issuer.alg_none,
        "hs": issuer.hs_confused,
        "signature": lambda: issuer.mint(kid="rsa-1")[:-4] + "AAAA",
        "issuer": lambda: issuer.mint(payload={**claims, "iss": "https://other"}),
        "no-exp": lambda: issuer.mint(payload={k: v for k, v in claims.items() if k != "exp"}),
        "future-iat": lambda: issuer.mint(payload={**claims, "iat": claims["iat"] + 600}),
        # An RSA token that names the EC key: the key's type must fit the alg.
        "kid-wrong-type": lambda: jwt.encode(claims, issuer.keys["rsa-1"][0], algorithm="RS256",
                                             headers={"kid": "ec-1"}),
    }
    assert reason(issuer, makers[kind]()) == expected


def test_leeway_is_bounded_and_applied(issuer: FakeIssuer) -> None:
    token = issuer.mint(ttl=-20)
    assert check(issuer, token, leeway_s=30)["sub"] == "db-agent"
    assert reason(issuer, token, leeway_s=10) == "expired"


def test_hs256_is_refused_even_when_allowed_by_a_careless_caller(issuer: FakeIssuer) -> None:
    """No `oct` key is ever loaded, so HS256 finds no key even if the alg list had it."""
    token = issuer.hs_confused()
    assert reason(issuer, token, algorithms=("HS256", "RS256")) in {"algorithm", "unknown_kid"}


def test_jwk_alg_must_match_the_token_alg(issuer: FakeIssuer) -> None:
    key = issuer.keys["rsa-1"][0]
    keys = parse_jwks({"keys": [public_jwk(key, "k", "RS384")]})
    token = jwt.encode(issuer.claims("a"), key, algorithm="RS256", headers={"kid": "k"})
    peeked = peek(token)
    assert peeked is not None
    with pytest.raises(Unauthorized) as info:
        verify(token, peeked, cfg(), keys, time.time())
    assert info.value.reason == "algorithm"


def test_jwks_drops_what_must_never_verify(issuer: FakeIssuer) -> None:
    good = public_jwk(issuer.keys["rsa-1"][0], "good")
    secret = {"kty": "oct", "kid": "hmac", "k": base64.urlsafe_b64encode(b"s" * 32).decode()}
    enc = {**public_jwk(issuer.keys["rsa-1"][0], "enc"), "use": "enc"}
    keys = parse_jwks({"keys": [good, secret, enc, {"kty": "RSA", "kid": "broken"}]})
    assert [k.kid for k in keys.keys] == ["good"]
    with pytest.raises(KeySetError):
        parse_jwks({"keys": [secret]})
    with pytest.raises(KeySetError):
        parse_jwks({"nope": []})


def test_key_cache_refetch_policy() -> None:
    cache = KeyCache(ttl_s=300, refetch_interval_s=30)
    assert cache.should_fetch("a", 0)
    cache.failed(0)
    assert not cache.should_fetch("a", 10)   # the issuer is not asked again at once
    assert cache.should_fetch("a", 31)
    fake = FakeIssuer(issuer=ISS)
    fake.add_key("a")
    cache.fetched(parse_jwks(fake.jwks()), 40)
    assert not cache.should_fetch("a", 50)
    assert not cache.should_fetch("unknown", 50)  # within the refetch interval
    assert cache.should_fetch("unknown", 71)
    assert not cache.should_fetch("a", 200)
    assert cache.should_fetch("a", 341)          # ttl


def test_claim_paths_with_dotted_names() -> None:
    payload = {"sub": "s", "kubernetes.io": {"namespace": "agents",
                                             "serviceaccount": {"name": "db"}}}
    assert claim_at(payload, "kubernetes.io.serviceaccount.name") == "db"
    assert claim_at(payload, "kubernetes.io.namespace") == "agents"
    assert claim_at(payload, "kubernetes.io.nope") is None
    issuer = cfg(agent_claim="kubernetes.io.serviceaccount.name",
                 claims=("sub", "kubernetes.io.namespace", "missing"))
    assert identity(payload, issuer) == ("db", {"sub": "s", "kubernetes.io.namespace": "agents"})
    with pytest.raises(Unauthorized):
        identity(payload, cfg(agents={"system:serviceaccount:agents:db": "db-agent"}))
    with pytest.raises(Unauthorized):
        identity({"sub": 5}, cfg())


@pytest.mark.parametrize(("headers", "query", "token", "where"), [
    ({"authorization": "Bearer T1"}, "", "T1", ("authorization",)),
    ({"x-api-key": "T2"}, "", "T2", ("x-api-key",)),
    ({"api-key": "T3"}, "", "T3", ("api-key",)),
    ({"x-goog-api-key": "T4"}, "", "T4", ("x-goog-api-key",)),
    ({"authorization": "Bearer T5", "x-api-key": "T5"}, "", "T5", ("authorization", "x-api-key")),
    ({}, "alt=sse&key=T6", "T6", ()),
    ({}, "%6Bey=T7", "T7", ()),
])
def test_credential_places(headers: dict[str, str], query: str, token: str,
                           where: tuple[str, ...]) -> None:
    cred = find(headers, query)
    assert cred is not None and cred.token == token and cred.headers == where


def test_sigv4_and_basic_authorization_are_not_credentials() -> None:
    assert find({"authorization": "AWS4-HMAC-SHA256 Credential=AKID/..."}) is None
    assert find({"authorization": "Basic dTpw"}) is None
    with pytest.raises(Unauthorized):
        find({}, "key=a&key=b")
    assert strip_query("alt=sse&key=T&x=1", "key") == "alt=sse&x=1"


def test_proxy_authorization() -> None:
    basic = base64.b64encode(b"agent:TOKEN").decode()
    assert from_proxy_authorization(f"Basic {basic}") is not None
    cred = from_proxy_authorization(f"Basic {basic}")
    assert cred is not None and cred.token == "TOKEN"
    cred = from_proxy_authorization("Bearer TOK")
    assert cred is not None and cred.token == "TOK" and cred.headers == ("proxy-authorization",)
    assert from_proxy_authorization("Digest x") is None


async def test_authenticator_k8s_claims_and_fail_closed() -> None:
    fake = FakeIssuer(issuer=K8S_ISSUER, url=K8S_ISSUER)
    fake.add_key("k")
    calls: list[str] = []
    up = {"ok": True}

    async def fetch(issuer: JwtIssuer) -> object:
        calls.append(issuer.issuer)
        if not up["ok"]:
            raise JwksUnavailable("down")
        return fake.jwks()

    clock = [0.0]
    settings = AuthSettings(Mode.REQUIRED, (JwtIssuer(
        K8S_ISSUER, ("tether",), jwks_url="https://k/jwks",
        agent_claim="kubernetes.io.serviceaccount.name", claims=("kubernetes.io.namespace",)),))
    auth = Authenticator(settings, {}, trust_headers=True, fetch=fetch,
                         monotonic=lambda: clock[0])
    who = await auth.identify({"authorization": f"Bearer {fake.k8s('agents', 'db')}",
                               "x-tether-agent": "root"})
    assert (who.agent, dict(who.claims), who.method) == ("db", {"kubernetes.io.namespace":
                                                               "agents"}, "jwt")
    assert who.drop_headers == ("authorization",)
    # Issuer down and no keys yet: a fresh authenticator refuses, fail closed.
    up["ok"] = False
    cold = Authenticator(settings, {}, trust_headers=True, fetch=fetch,
                         monotonic=lambda: clock[0])
    with pytest.raises(Unauthorized) as info:
        await cold.identify({"authorization": f"Bearer {fake.k8s('agents', 'db')}"})
    assert info.value.reason == "jwks_unavailable"
    # With keys already held, a failed refresh keeps them.
    clock[0] = 1000.0
    assert (await auth.identify({"x-api-key": fake.k8s("agents", "db")})).agent == "db"
