"""Verifying a JWT against one issuer's keys, and reading the agent from it.

Sans-IO: the key set and the clock are arguments. The order of checks is the
order that costs an attacker the least of our CPU and tells them the least:
shape, issuer (unverified, only to pick the issuer's keys), algorithm (from the
issuer's allow-list, before any key is touched), key (kid and key type must fit
the algorithm), signature, audience, then the times with bounded leeway. A
symmetric algorithm never reaches a key: HS256 is not on any allow-list (the
config refuses it) and no `oct` key is ever loaded, so a public key cannot be
used as an HMAC secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import jwt
from jwt.exceptions import (
    DecodeError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

from ..errors import Unauthorized
from .jwks import KeySet
from .settings import JwtIssuer

MAX_TOKEN = 16 * 1024
MAX_AGENT = 200


class Reason(StrEnum):
    """Why a request was refused 401: the closed set of `tether_auth_failures{reason}`."""

    MISSING = "missing"                  # no credential, and auth.mode is required
    MALFORMED = "malformed"              # not a JWT we can read / claims of the wrong type
    UNKNOWN_KEY = "unknown_key"          # a static key that names no agent
    ISSUER = "issuer"                    # iss is not a configured issuer
    AUDIENCE = "audience"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"      # nbf, or iat in the future
    ALGORITHM = "algorithm"              # alg not allowed, or not the key's
    UNKNOWN_KID = "unknown_kid"
    SIGNATURE = "signature"
    JWKS_UNAVAILABLE = "jwks_unavailable"
    AGENT = "agent"                      # no usable agent claim, or not in auth.jwt.agents


def refuse(reason: Reason, message: str) -> Unauthorized:
    return Unauthorized(f"tether: {message}", reason.value)


@dataclass(frozen=True, slots=True)
class Peeked:
    """A JWT's header and issuer, read before anything is verified: only used to
    choose which issuer's keys and allow-list judge it."""

    alg: str
    kid: str | None
    iss: str | None


def _b64json(segment: str) -> object:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (binascii.Error, ValueError, UnicodeError, RecursionError):  # `[[[[…` nests deep
        return None


def peek(token: str) -> Peeked | None:
    """None when the credential is not shaped like a JWS compact token (a static key)."""
    if len(token) > MAX_TOKEN or token.count(".") != 2:
        return None
    head, body, _sig = token.split(".")
    header, payload = _b64json(head), _b64json(body)
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    alg, kid, iss = header.get("alg"), header.get("kid"), payload.get("iss")
    if not isinstance(alg, str):
        return None
    return Peeked(alg, kid if isinstance(kid, str) else None, iss if isinstance(iss, str) else None)


def _number(payload: Mapping[str, object], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise refuse(Reason.MALFORMED, f"the token's {name} claim is not a number")
    return float(value)


def check_times(payload: Mapping[str, object], now: float, leeway: float) -> None:
    exp = _number(payload, "exp")
    if exp is None:
        raise refuse(Reason.MALFORMED, "the token has no exp claim")
    if now > exp + leeway:
        raise refuse(Reason.EXPIRED, "the token has expired")
    nbf = _number(payload, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise refuse(Reason.NOT_YET_VALID, "the token is not valid yet (nbf)")
    iat = _number(payload, "iat")
    if iat is not None and now + leeway < iat:
        raise refuse(Reason.NOT_YET_VALID, "the token was issued in the future (iat)")


def verify(token: str, peeked: Peeked, issuer: JwtIssuer, keys: KeySet,
           now: float) -> dict[str, object]:
    """The verified payload, or `Unauthorized` naming the first check that failed."""
    if peeked.alg not in issuer.algorithms:
        raise refuse(Reason.ALGORITHM, f"the token's algorithm {peeked.alg!r} is not allowed")
    candidates = keys.candidates(peeked.kid, peeked.alg)
    if not candidates:
        if peeked.kid is not None and keys.knows(peeked.kid):
            raise refuse(Reason.ALGORITHM, f"key {peeked.kid!r} is not a {peeked.alg} key")
        raise refuse(Reason.UNKNOWN_KID, "the token's key id is not in the issuer's key set"
                     if peeked.kid else "the token names no key id")
    payload: dict[str, object] | None = None
    for key in candidates:
        try:
            payload = jwt.decode(
                token, key.key, algorithms=[peeked.alg],  # type: ignore[arg-type]
                audience=list(issuer.audiences), issuer=issuer.issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "require": ["iss", "aud", "exp"]})
            break
        except InvalidSignatureError:
            continue
        except InvalidAudienceError:
            raise refuse(Reason.AUDIENCE, "the token is not for this audience") from None
        except InvalidIssuerError:
            raise refuse(Reason.ISSUER, "the token's issuer is not configured") from None
        except (MissingRequiredClaimError, DecodeError) as e:
            raise refuse(Reason.MALFORMED, f"the token cannot be used: {e}") from None
        except PyJWTError as e:
            raise refuse(Reason.MALFORMED, f"the token cannot be used: {type(e).__name__}"
                         ) from None
    if payload is None:
        raise refuse(Reason.SIGNATURE, "the token's signature does not verify")
    check_times(payload, now, issuer.leeway_s)
    return payload


def claim_at(payload: Mapping[str, object], path: str) -> object | None:
    """A claim by dotted path. Claim names may hold dots themselves
    (`kubernetes.io`), so the longest name that exists wins at each level."""
    parts = path.split(".")

    def walk(node: object, rest: list[str]) -> object | None:
        if not rest:
            return node
        if not isinstance(node, dict):
            return None
        for i in range(len(rest), 0, -1):
            name = ".".join(rest[:i])
            if name in node:
                found = walk(node[name], rest[i:])
                if found is not None:
                    return found
        return None

    return walk(payload, parts)


def printable(name: str) -> bool:
    """No control, format (zero-width, bidi overrides), separator-line or unassigned
    characters: an agent name lands in audit records, logs, rules and approval
    messages, where a newline or a right-to-left override would forge or hide text."""
    return not any(unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")
                   for ch in name)


def identity(payload: Mapping[str, object], issuer: JwtIssuer
             ) -> tuple[str, dict[str, object]]:
    """The agent the token names, and the claims the config exposes to policy."""
    value = claim_at(payload, issuer.agent_claim)
    if not isinstance(value, str) or not value or len(value) > MAX_AGENT or not printable(value):
        raise refuse(Reason.AGENT, f"the token has no usable {issuer.agent_claim} claim")
    agent = issuer.agents.get(value) if issuer.agents else value
    if agent is None:
        raise refuse(Reason.AGENT, f"no agent is configured for this token's "
                     f"{issuer.agent_claim}")
    claims: dict[str, object] = {}
    for name in issuer.claims:
        found = claim_at(payload, name)
        if found is not None:
            claims[name] = found
    return agent, claims
