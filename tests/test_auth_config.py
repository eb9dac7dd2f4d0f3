"""The `auth:` config section: what loads, and file:line errors for what must not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy.auth.settings import Mode
from proxy.errors import ConfigError
from tests.fakes.oidc import FakeIssuer

GOOD = """auth:
  mode: required
  jwt:
    - issuer: https://oidc.example.com
      audiences: [tether]
      algorithms: [RS256, ES256, EdDSA]
      leeway: 60
      agent_claim: email
      agents: {"a@example.com": a}
      claims: [sub, groups]
    - issuer: https://kubernetes.default.svc.cluster.local
      audiences: tether
      jwks_url: https://kubernetes.default.svc/openid/v1/jwks
      token_file: /var/run/secrets/kubernetes.io/serviceaccount/token
"""


def load(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "tether.yaml"
    path.write_text(text)
    return config_mod.load(path, env={})


def test_good_config_loads(tmp_path: Path) -> None:
    cfg = load(tmp_path, GOOD)
    assert cfg.auth.mode is Mode.REQUIRED and cfg.auth.required
    first, k8s = cfg.auth.issuers
    assert first.algorithms == ("RS256", "ES256", "EdDSA") and first.leeway_s == 60
    assert first.agents == {"a@example.com": "a"} and first.claims == ("sub", "groups")
    assert first.discovery_url == "https://oidc.example.com/.well-known/openid-configuration"
    assert k8s.audiences == ("tether",) and k8s.jwks_url and k8s.token_file
    assert not any("not enforced" in w for w in cfg.warnings)
    # The default upstreams hold no key: the consumed credential leaves them keyless.
    # (It has no rules: the open-gate warning of docs/reload.md is not this test's concern.)
    assert [w.split(": ", 1)[1] for w in cfg.warnings if "no rules" not in w] == [
        "auth.mode is required, and upstreams anthropic, gemini, openai have neither "
        "api_key_env/api_key_file nor agent_credentials: pass: the agent's tether credential "
        "is consumed, so their requests go upstream with no API key"]


def test_no_auth_is_optional(tmp_path: Path) -> None:
    cfg = load(tmp_path, "rules: []\n")
    assert cfg.auth.mode is Mode.OPTIONAL and cfg.auth.issuers == ()


def test_jwks_file_is_read_at_load(tmp_path: Path) -> None:
    fake = FakeIssuer(issuer="https://k")
    fake.add_key("a")
    (tmp_path / "jwks.json").write_text(json.dumps(fake.jwks()))
    cfg = load(tmp_path, "auth:\n  jwt: {issuer: https://k, audiences: [t], jwks_file: jwks.json}\n")
    assert cfg.auth.issuers[0].jwks_file == str(tmp_path / "jwks.json")


@pytest.mark.parametrize(("body", "line", "message"), [
    ("  mode: strict\n", 2, "auth.mode: must be required or optional"),
    ("  modes: required\n", 2, "auth.modes: unknown key"),
    ("  jwt: {issuer: https://i, audiences: [t], algorithms: [HS256]}\n", 2,
     "'HS256' is not allowed (HMAC"),
    ("  jwt: {issuer: https://i, audiences: [t], algorithms: [none]}\n", 2,
     "'none' is not allowed (an unsigned token"),
    ("  jwt: {issuer: https://i}\n", 2, "auth.jwt.audiences: is required"),
    ("  jwt: {audiences: [t]}\n", 2, "auth.jwt.issuer: is required"),
    ("  jwt:\n    issuer: https://i\n    audiences: [t]\n    leeway: 900\n", 5,
     "auth.jwt.leeway: must be a whole number of seconds from 0 to 300"),
    ("  jwt: {issuer: https://i, audiences: [t], jwks_url: 'http://idp.example/jwks'}\n", 2,
     "must be an https:// URL"),
    ("  jwt: {issuer: 'http://idp.example', audiences: [t]}\n", 2, "discovery needs an https"),
    ("  jwt: {issuer: https://i, audiences: [t], jwks_file: missing.json}\n", 2, "cannot read"),
    ("  jwt: {issuer: https://i, audiences: [t], jwks_file: bad.json}\n", 2,
     "is not a usable JWKS"),
    ("  jwt: {issuer: https://i, audiences: [t], agents: [a]}\n", 2, "must map claim values"),
    ("  jwt: {issuer: https://i, audiences: [t], ca_file: nope.pem}\n", 2, "does not exist"),
    ("  jwt:\n    - {issuer: https://i, audiences: [t]}\n    - {issuer: https://i, audiences: [u]}\n",
     4, "configured twice"),
    ("  jwt: {issuer: https://i, audiences: [t], refetch_interval: 0}\n", 2,
     "auth.jwt.refetch_interval"),
])
def test_bad_config_names_file_and_line(tmp_path: Path, body: str, line: int,
                                        message: str) -> None:
    (tmp_path / "bad.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "auth:\n" + body)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'tether.yaml'}:{line}:"), text
    assert message in text, text
