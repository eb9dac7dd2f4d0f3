"""The `auth:` config section, compiled once at load with file:line errors.

```yaml
auth:
  mode: required            # required: no valid identity -> 401; optional (default)
  jwt:                      # one issuer, or a list of them
    issuer: https://oidc.example.com
    audiences: [tether]     # required: a token minted for another service is refused
    jwks_url: https://oidc.example.com/.well-known/jwks.json
    # or jwks_file: jwks.json (read at load and re-read on an unknown kid);
    # neither: discovered from ISSUER/.well-known/openid-configuration
    ca_file: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt   # extra CA for the fetch
    token_file: /var/run/secrets/kubernetes.io/serviceaccount/token # bearer for the fetch
    algorithms: [RS256, ES256]   # asymmetric only; none and HS* are refused
    leeway: 30              # seconds of clock skew allowed, at most 300
    agent_claim: sub        # or a dotted path: kubernetes.io.serviceaccount.name
    agents: {"system:serviceaccount:agents:db-agent": db-agent}  # claim value -> agent
    claims: [sub, groups]   # exposed to policy as Exchange.claims
    cache_ttl: 300          # seconds a fetched key set is used before it is refreshed
    refetch_interval: 30    # an unknown kid refetches at most this often
```

Static keys stay under `agents.NAME.key_sha256` (config.py reads them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from ..config_tables_run import AUTH, JWT
from ..errors import ConfigError
from ..policy.source import YMap
from ..upstreams import Upstream
from .jwks import KeySetError, parse_jwks

KEYS = AUTH.names  # documented in config_tables_run.py
JWT_KEYS = JWT.names
# Asymmetric only: with an HMAC algorithm the verification key is the signing key,
# and a public key read from a JWKS could be used as an HMAC secret to forge tokens.
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")
MAX_LEEWAY = 300
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class Mode(StrEnum):
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class JwtIssuer:
    issuer: str
    audiences: tuple[str, ...]
    jwks_url: str | None = None      # None with jwks_file None: OIDC discovery
    jwks_file: str | None = None
    ca_file: str | None = None
    token_file: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: int = 30
    agent_claim: str = "sub"
    agents: Mapping[str, str] = field(default_factory=dict)
    claims: tuple[str, ...] = ()
    cache_ttl_s: int = 300
    refetch_interval_s: int = 30

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    mode: Mode = Mode.OPTIONAL
    issuers: tuple[JwtIssuer, ...] = ()

    @property
    def required(self) -> bool:
        return self.mode is Mode.REQUIRED


def _err(message: str, node: YMap, key: str, where: str = "auth") -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def _check_keys(node: YMap, allowed: frozenset[str], where: str) -> None:
    for key in node:
        if key not in allowed:
            raise _err(f"unknown key (expected one of {', '.join(sorted(allowed))})", node, key,
                       where)


def fetch_url_ok(url: str) -> bool:
    """https, or plain http to a loopback address only (tests, a local sidecar)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and (parts.hostname or "") in LOOPBACK


def _text(node: YMap, key: str, where: str) -> str | None:
    value = node.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _err("must be a non-empty string", node, key, where)
    return value.strip()


def _strings(node: YMap, key: str, where: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = node.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _err("must be a list of strings", node, key, where)
    return tuple(v.strip() for v in value)


def _seconds(node: YMap, key: str, where: str, default: int, low: int, high: int) -> int:
    value = node.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _err(f"must be a whole number of seconds from {low} to {high}", node, key, where)
    return value


def _path(node: YMap, key: str, where: str, base: Path) -> str | None:
    value = _text(node, key, where)
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _issuer(node: YMap, where: str, base: Path) -> JwtIssuer:
    _check_keys(node, JWT_KEYS, where)
    issuer = _text(node, "issuer", where)
    if issuer is None:
        raise _err("is required: the `iss` the tokens carry", node, "issuer", where)
    audiences = _strings(node, "audiences", where, ())
    if not audiences:
        raise _err("is required: tokens minted for another service must not pass", node,
                   "audiences", where)
    algorithms = _strings(node, "algorithms", where, ("RS256", "ES256"))
    for alg in algorithms:
        if alg not in ASYMMETRIC:
            why = ("an unsigned token proves nothing" if alg.lower() == "none" else
                   "HMAC needs a shared secret, and a public key used as one forges tokens"
                   if alg.upper().startswith("HS") else "not a known JWS algorithm")
            raise _err(f"{alg!r} is not allowed ({why}); use {', '.join(ASYMMETRIC)}", node,
                       "algorithms", where)
    jwks_url = _text(node, "jwks_url", where)
    jwks_file = _path(node, "jwks_file", where, base)
    if jwks_url and jwks_file:
        raise _err("give jwks_url or jwks_file, not both", node, "jwks_file", where)
    if jwks_url and not fetch_url_ok(jwks_url):
        raise _err("must be an https:// URL (http only to a loopback address)", node,
                   "jwks_url", where)
    if not jwks_url and not jwks_file and not fetch_url_ok(issuer):
        raise _err("discovery needs an https:// issuer; or give jwks_url or jwks_file", node,
                   "issuer", where)
    if jwks_file:
        try:
            parse_jwks(json.loads(Path(jwks_file).read_text(encoding="utf-8")))
        except OSError as e:
            raise _err(f"cannot read {jwks_file}: {e.strerror}", node, "jwks_file", where) from e
        except (ValueError, KeySetError) as e:
            raise _err(f"{jwks_file} is not a usable JWKS: {e}", node, "jwks_file", where) from e
    ca_file = _path(node, "ca_file", where, base)
    if ca_file and not Path(ca_file).is_file():
        raise _err(f"{ca_file} does not exist", node, "ca_file", where)
    agents_node = node.get("agents", {})
    if not isinstance(agents_node, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in agents_node.items()):
        raise _err("must map claim values to agent names", node, "agents", where)
    agent_claim = _text(node, "agent_claim", where) or "sub"
    return JwtIssuer(
        issuer=issuer,
        audiences=audiences,
        jwks_url=jwks_url,
        jwks_file=jwks_file,
        ca_file=ca_file,
        token_file=_path(node, "token_file", where, base),
        algorithms=algorithms,
        leeway_s=_seconds(node, "leeway", where, 30, 0, MAX_LEEWAY),
        agent_claim=agent_claim,
        agents=dict(agents_node),
        claims=_strings(node, "claims", where, ()),
        cache_ttl_s=_seconds(node, "cache_ttl", where, 300, 10, 86400),
        refetch_interval_s=_seconds(node, "refetch_interval", where, 30, 1, 3600),
    )


def parse_auth(node: object, parent: YMap, base: Path) -> AuthSettings:
    """`base`: the config file's directory, which relative paths are read from."""
    if node is None:
        return AuthSettings()
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of("auth"),
                          key="auth")
    _check_keys(node, KEYS, "auth")
    mode_text = node.get("mode", "optional")
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise _err("must be required or optional", node, "mode") from None
    raw = node.get("jwt")
    items: list[object] = [] if raw is None else list(raw) if isinstance(raw, list) else [raw]
    issuers: list[JwtIssuer] = []
    for i, item in enumerate(items):
        if not isinstance(item, YMap):
            raise _err("must be a mapping (or a list of them), one per issuer", node, "jwt")
        issuer = _issuer(item, f"auth.jwt[{i}]" if isinstance(raw, list) else "auth.jwt", base)
        if any(known.issuer == issuer.issuer for known in issuers):
            raise _err(f"issuer {issuer.issuer!r} is configured twice", item, "issuer",
                       "auth.jwt")
        issuers.append(issuer)
    return AuthSettings(mode=mode, issuers=tuple(issuers))


def load_warnings(auth: AuthSettings, upstreams: Mapping[str, Upstream],
                  transparent_unnamed: bool, file: str) -> list[str]:
    """What `auth.mode: required` makes surprising in the rest of the config.
    `transparent_unnamed`: the transparent proxy listens with no `transparent_agent`."""
    if not auth.required:
        return []
    out: list[str] = []
    # Bedrock is signed with tether's own AWS credentials, never the agent's key.
    keyless = sorted(name for name, up in upstreams.items() if name != "bedrock"
                     and not up.has_key_source and not up.pass_agent_credentials)
    if keyless:
        out.append(f"{file}: auth.mode is required, and upstreams {', '.join(keyless)} have "
                   "neither api_key_env/api_key_file nor agent_credentials: pass: the agent's "
                   "tether credential is consumed, so their requests go upstream with no API key")
    if transparent_unnamed:
        out.append(f"{file}: auth.mode is required and forward.transparent_agent is not set: "
                   "transparent requests to tool, cloud and pass hosts are refused (401)")
    return out
