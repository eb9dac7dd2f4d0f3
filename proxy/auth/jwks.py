"""JSON Web Key Sets: which keys may verify which token, and when to fetch again.

Sans-IO. `parse_jwks` turns a fetched JWKS document into a `KeySet` of public
keys; `KeyCache` holds the current set and answers "fetch now?" from the clock
it is given, so a flood of tokens with random `kid`s costs the issuer at most
one fetch per `refetch_interval`, and an issuer that is down is not asked again
on every request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

# The key type (and curve) each allowed algorithm needs. A JWK verifies a token
# only when its kty/crv fit the token's alg and its own `alg`, if any, is that alg.
KEY_TYPE: Mapping[str, tuple[str, frozenset[str]]] = {
    **{a: ("RSA", frozenset()) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
MAX_KEYS = 100


class KeySetError(ValueError):
    """A JWKS document that holds no usable key."""


@dataclass(frozen=True, slots=True)
class Jwk:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: object      # a cryptography public key

    def fits(self, alg: str) -> bool:
        need = KEY_TYPE.get(alg)
        if need is None or self.kty != need[0]:
            return False
        if need[1] and self.crv not in need[1]:
            return False
        return self.alg is None or self.alg == alg


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[Jwk, ...]

    def candidates(self, kid: str | None, alg: str) -> list[Jwk]:
        """The keys that may verify a token with this kid and alg. A token without a
        kid is verified only when exactly one key fits (never a trial of every key)."""
        if kid is None:
            fit = [k for k in self.keys if k.fits(alg)]
            return fit if len(fit) == 1 else []
        return [k for k in self.keys if k.kid == kid and k.fits(alg)]

    def knows(self, kid: str | None) -> bool:
        return kid is None or any(k.kid == kid for k in self.keys)


def _public_key(kty: str, raw: Mapping[str, object]) -> object:
    text = json.dumps(raw)
    if kty == "RSA":
        return RSAAlgorithm.from_jwk(text)
    if kty == "EC":
        return ECAlgorithm.from_jwk(text)
    return OKPAlgorithm.from_jwk(text)


def _one(raw: Mapping[str, object]) -> Jwk | None:
    """A public signing key, or None for what must never verify (symmetric `oct`
    keys, private keys, encryption keys, unknown types)."""
    kty = raw.get("kty")
    if kty not in ("RSA", "EC", "OKP") or "d" in raw or raw.get("use", "sig") != "sig":
        return None
    ops = raw.get("key_ops")
    if isinstance(ops, list) and "verify" not in ops:
        return None
    kid, crv, alg = raw.get("kid"), raw.get("crv"), raw.get("alg")
    if alg is not None and alg not in KEY_TYPE:
        return None  # e.g. "HS256" or "none" on a key: never used
    assert isinstance(kty, str)
    try:
        key = _public_key(kty, raw)
    except (InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    return Jwk(kid if isinstance(kid, str) else None, kty, crv if isinstance(crv, str) else None,
               alg if isinstance(alg, str) else None, key)


def parse_jwks(doc: object) -> KeySet:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError('not a JWKS (an object with a "keys" list)')
    raw_keys = doc["keys"][:MAX_KEYS]
    keys = [k for k in (_one(r) for r in raw_keys if isinstance(r, dict)) if k is not None]
    if not keys:
        raise KeySetError("no usable public signing key (RSA, EC or OKP)")
    return KeySet(tuple(keys))


@dataclass(slots=True)
class KeyCache:
    """One issuer's key set and the times that decide the next fetch."""

    ttl_s: float
    refetch_interval_s: float
    keys: KeySet | None = None
    fetched_at: float | None = None     # last successful fetch
    attempted_at: float | None = None   # last fetch, successful or not
    failures: int = field(default=0)

    def should_fetch(self, kid: str | None, now: float) -> bool:
        recent = self.attempted_at is not None and now - self.attempted_at < self.refetch_interval_s
        if recent:
            return False
        if self.keys is None or self.fetched_at is None:
            return True
        if now - self.fetched_at >= self.ttl_s:
            return True
        return not self.keys.knows(kid)

    def fetched(self, keys: KeySet, now: float) -> None:
        self.keys, self.fetched_at, self.attempted_at, self.failures = keys, now, now, 0

    def failed(self, now: float) -> None:
        """A failed refresh keeps the keys already held (they were valid a moment ago)."""
        self.attempted_at = now
        self.failures += 1
