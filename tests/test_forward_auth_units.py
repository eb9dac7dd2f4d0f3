"""Units of forward-proxy authentication: the handoff tickets, who a transparent or
proxied request is (ForwardIdentity, with a real Authenticator over static keys),
the load-time warnings `auth.mode: required` brings, and Bedrock's 401 shape."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from botocore.awsrequest import HTTPHeaders
from botocore.parsers import RestJSONParser

from proxy import config as config_mod
from proxy.auth.authenticator import Authenticator, Identity
from proxy.auth.credentials import Credential
from proxy.auth.handoff import HEADER, Handoffs
from proxy.auth.settings import AuthSettings, JwtIssuer, Mode
from proxy.errors import ConfigError, Unauthorized
from proxy.forward.identity import ForwardIdentity, Found
from proxy.providers.bedrock import error_reply
from proxy.telemetry import Metrics

KEY = "tk-unit-key"
KEYS = {hashlib.sha256(KEY.encode()).hexdigest(): "key-agent"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def no_fetch(issuer: JwtIssuer) -> object:
    raise AssertionError("no issuer is configured")


def authenticator(mode: Mode, clock: Clock | None = None,
                  metrics: Metrics | None = None) -> Authenticator:
    return Authenticator(AuthSettings(mode=mode), KEYS, trust_headers=True, fetch=no_fetch,
                         metrics=metrics, monotonic=clock or Clock())


# -- handoff tickets ------------------------------------------------------------------------

def test_a_ticket_is_redeemed_once_and_not_after_it_expires() -> None:
    clock = Clock()
    tickets = Handoffs(clock, ttl_s=60)
    who = Identity("a", {"sub": "a"}, "jwt")
    name = tickets.issue(who)
    assert len(name) >= 40 and tickets.redeem(name) == who
    assert tickets.redeem(name) is None                       # used
    late = tickets.issue(who)
    clock.now += 61
    assert tickets.redeem(late) is None                       # expired
    assert tickets.redeem("made-up") is None


def test_open_tickets_are_bounded() -> None:
    clock = Clock()
    tickets = Handoffs(clock, max_open=3)
    names = [tickets.issue(Identity(str(i))) for i in range(5)]
    assert len(tickets.open) == 3
    assert tickets.redeem(names[0]) is None and tickets.redeem(names[4]) == Identity("4")


async def test_the_reverse_route_reads_a_ticket_and_refuses_a_forged_one() -> None:
    metrics = Metrics()
    auth = authenticator(Mode.REQUIRED, metrics=metrics)
    _, name = auth.hand_off(Identity("pod-agent", {}, "transparent"))
    who = await auth.identify({HEADER: name, "x-tether-agent": "other"})
    assert (who.agent, who.method) == ("pod-agent", "transparent")
    assert HEADER in who.drop_headers
    for forged in (name, "forged"):                             # replayed, made up
        with pytest.raises(Unauthorized) as e:
            await auth.identify({HEADER: forged, "authorization": f"Bearer {KEY}"})
        assert e.value.reason == "malformed"
    assert metrics.registry.get_sample_value("tether_auth_failures_total",
                                             {"reason": "malformed"}) == 2


async def test_a_handed_credential_is_verified_there_and_consumed_wherever_it_is() -> None:
    auth = authenticator(Mode.REQUIRED)
    _, name = auth.hand_off(Credential(KEY, ("proxy-authorization",)))
    who = await auth.identify({HEADER: name, "authorization": f"Bearer {KEY}",
                               "x-api-key": "sk-real-upstream-key"})
    assert who.agent == "key-agent"
    # The same key sent in the request itself goes nowhere either; another key may.
    assert set(who.drop_headers) == {HEADER, "authorization"}
    _, bad = auth.hand_off(Credential("tk-unknown", ("proxy-authorization",)))
    with pytest.raises(Unauthorized) as e:
        await auth.identify({HEADER: bad})
    assert e.value.reason == "unknown_key"


# -- who a forwarded request is -------------------------------------------------------------

def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{password}".encode()).decode()


async def test_transparent_traffic_is_the_configured_agent() -> None:
    fwd = ForwardIdentity(authenticator(Mode.REQUIRED), KEYS, True, "pod-agent")
    for llm in (False, True):
        found = await fwd.request("c1", {"x-tether-agent": "spoof"}, transparent=True, llm=llm)
        assert found.identity is not None and found.identity.agent == "pod-agent"
        assert found.handoff == found.identity


async def test_transparent_traffic_without_an_agent_under_required_fails_closed() -> None:
    metrics = Metrics()
    fwd = ForwardIdentity(authenticator(Mode.REQUIRED, metrics=metrics), KEYS, True)
    with pytest.raises(Unauthorized) as e:
        await fwd.request("c1", {"authorization": f"Bearer {KEY}",
                                 "proxy-authorization": basic(KEY)}, transparent=True, llm=False)
    assert "forward.transparent_agent" in e.value.message
    assert metrics.registry.get_sample_value("tether_auth_failures_total",
                                             {"reason": "missing"}) == 1
    # An LLM request goes on: the reverse route reads the SDK's own key (a tether key).
    assert await fwd.request("c1", {}, transparent=True, llm=True) == Found(None, None)


async def test_optional_mode_names_by_static_key_or_trusted_header() -> None:
    fwd = ForwardIdentity(authenticator(Mode.OPTIONAL), KEYS, True)
    found = await fwd.request("c", {"authorization": f"Bearer {KEY}"}, transparent=True,
                              llm=False)
    assert found.identity is not None and found.identity.agent == "key-agent"
    found = await fwd.request("c", {"x-tether-agent": "hdr"}, transparent=False, llm=False)
    assert found.identity is not None and found.identity.agent == "hdr"
    found = await fwd.request("c", {"proxy-authorization": basic(KEY), "x-tether-agent": "h"},
                              transparent=False, llm=False)
    assert found.identity is not None and found.identity.agent == "key-agent"


async def test_required_mode_ignores_the_header_and_binds_the_tunnel() -> None:
    fwd = ForwardIdentity(authenticator(Mode.REQUIRED), KEYS, True)
    with pytest.raises(Unauthorized):
        await fwd.request("c", {"x-tether-agent": "db-agent"}, transparent=False, llm=False)
    with pytest.raises(Unauthorized):
        await fwd.connect("c", {"proxy-authorization": f"Bearer {'x' * 20000}"})
    who = await fwd.connect("c", {"proxy-authorization": f"Bearer {KEY}"})
    assert who.agent == "key-agent" and fwd.in_tunnel("c")
    inner = await fwd.request("c", {}, transparent=False, llm=False)
    assert inner.identity is not None and inner.identity.agent == "key-agent"
    llm = await fwd.request("c", {}, transparent=False, llm=True)
    assert llm.identity is None and llm.handoff == Credential(KEY, ("proxy-authorization",))
    fwd.forget("c")
    assert not fwd.in_tunnel("c")


# -- load-time warnings ---------------------------------------------------------------------

def load(tmp_path: Path, text: str) -> config_mod.Config:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return config_mod.load(path, env={"OPENAI_KEY": "k"})


def test_required_mode_warns_of_upstreams_without_a_key(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k")
    cfg = load(tmp_path, "auth: {mode: required}\nupstreams:\n"
               "  openai: {url: 'https://api.openai.com', api_key_env: OPENAI_KEY}\n"
               "  anthropic: {url: 'https://api.anthropic.com', agent_credentials: pass}\n"
               "  gemini: {url: 'https://generativelanguage.googleapis.com', "
               f"api_key_file: {tmp_path / 'key'}}}\n"
               "  azure: {url: 'https://x.openai.azure.com'}\n")
    [warning] = [w for w in cfg.warnings if "auth.mode" in w]
    assert "upstreams azure have neither" in warning and "no API key" in warning
    assert not [w for w in load(tmp_path, "upstreams:\n  azure: {url: 'https://x'}\n").warnings
                if "auth.mode" in w]


def test_required_mode_warns_when_transparent_traffic_has_no_agent(tmp_path: Path) -> None:
    text = "auth: {mode: required}\nforward: {transparent_port: 15001%s}\n"
    assert any("transparent_agent is not set" in w for w in load(tmp_path, text % "").warnings)
    cfg = load(tmp_path, text % ", transparent_agent: pod-agent")
    assert not any("transparent_agent" in w for w in cfg.warnings)
    assert cfg.forward.transparent_agent == "pod-agent"
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "forward: {transparent_agent: ''}\n")
    assert e.value.key == "forward.transparent_agent"


# -- Bedrock's 401 --------------------------------------------------------------------------

def test_bedrock_401_is_an_unrecognized_client_as_botocore_reads_it() -> None:
    reply = error_reply(401, "tether: the token has expired", "unauthenticated")
    assert reply.headers["x-amzn-ErrorType"] == "UnrecognizedClientException"
    headers = HTTPHeaders()
    for k, v in reply.headers.items():
        headers[k] = v
    parsed = RestJSONParser().parse({"status_code": 401, "headers": headers,
                                     "body": reply.body}, None)
    assert parsed["Error"]["Code"] == "UnrecognizedClientException"
    assert parsed["Error"]["Message"] == json.loads(reply.body)["message"]
