"""Every spelling of every governed endpoint, through a running tether, on raw sockets.

SDKs normalise paths, so these requests are written byte for byte on a socket.
One recording upstream (`FakeToolApi`) stands behind every provider prefix,
`/apis/jira/` and `/mcp/tools`: what reaches it is exactly what tether let
through. The rule under test (`proxy.paths`, docs/hardening.md "Routes"): a
path is canonicalised, then governed; a spelling with more than one reading is
400, a well-formed near-miss of a governed endpoint 404, a path under no prefix
404, each in the provider's own error shape, audited and counted, and nothing
reaches the upstream. The negative side: pass-through paths (model ids with
`:`, Bedrock ARNs with `%2F`, Gemini's `%3A`, Azure's `api-version`, non-ASCII
text on `/apis/`) still arrive byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.demo.fake_tool_api import FakeToolApi
from tests.conftest import MakeStack, Stack

SPECS = Path(__file__).resolve().parent.parent / "rules" / "openapi"
EXTRA = f"""
upstreams:
  bedrock: {{url: 'http://unused', region: us-east-1}}
apis:
  jira: {{url: https://jira.invalid, spec: {SPECS / 'jira.yaml'}}}
mcp:
  tools: {{url: http://mcp.invalid/mcp}}
"""
BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1%3A0"
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


@dataclass(frozen=True)
class Target:
    """A governed endpoint: how to call it and the error shape its SDK reads."""

    method: str
    path: str
    body: bytes
    shape: str  # openai | anthropic | bedrock | gemini | apis | mcp
    query: str = ""
    near_miss: str = ""  # a well-formed spelling that must be 404, not passed


TARGETS = [
    Target("POST", "/openai/v1/chat/completions", CHAT, "openai",
           near_miss="/openai/v1/chat/Completions"),
    Target("POST", "/openai/v1/responses", b'{"model": "m", "input": "hi"}', "openai",
           near_miss="/openai/v1/Responses"),
    Target("POST", "/azure/openai/deployments/d1/chat/completions", CHAT, "openai",
           query="api-version=2024-10-21",
           near_miss="/azure/openai/deployments/d1/chat/completions/"),
    Target("POST", "/azure/openai/v1/chat/completions", CHAT, "openai",
           near_miss="/azure/openai/v1/chat/completions/"),
    Target("POST", "/azure/openai/v1/responses", b'{"model": "m", "input": "hi"}', "openai",
           near_miss="/azure/openai/v2/responses"),
    Target("POST", "/anthropic/v1/messages",
           b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}',
           "anthropic", near_miss="/anthropic/v1/Messages"),
    Target("POST", f"/bedrock/model/{BEDROCK_MODEL}/converse", b'{"messages": []}', "bedrock",
           near_miss=f"/bedrock/model/{BEDROCK_MODEL}/Converse"),
    Target("POST", f"/bedrock/model/{BEDROCK_MODEL}/converse-stream", b'{"messages": []}',
           "bedrock", near_miss=f"/bedrock/model/{BEDROCK_MODEL}/converse-stream/"),
    Target("POST", "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
           b'{"contents": []}', "gemini",
           near_miss="/gemini/v1beta/models/gemini-2.0-flash:GenerateContent"),
    Target("POST", "/gemini/v1beta/openai/chat/completions", CHAT, "gemini",
           near_miss="/gemini/v1beta/openai/chat/Completions"),
    Target("GET", "/apis/jira/rest/api/2/issue/OPS-1", b"", "apis"),
    Target("GET", "/mcp/tools/sse", b"", "mcp"),
]

# Appended to the governed path's last segment. Each must be refused 400.
SUFFIXES = [
    "%20", "%09", "%0A", "%0a", "%0D", "%00", "%7F",              # whitespace, controls
    ".", "..", "%2E", "/.", "/..",                                 # dots
    "%E2%80%8B", "%E2%80%AE", "%EF%BB%BF", "%C2%AD", "%EF%B8%8F",  # invisible, bidi, BOM
    "%C2%A0", "%E3%80%80", "%C2%85",                               # Unicode spaces, C1
    "%EF%BD%93",                                                   # a full-width letter
    "%C0%AE", "%FF",                                               # not UTF-8
    ";x=1", "%3B", "%3F", "%23", "%2F", "%5C", "%25", "%2500",     # separators, %-in-%
    "%", "%4", "%zz",                                              # malformed escapes
]


def infixes(path: str) -> list[str]:
    """Spellings that change the path before its last segment."""
    head, _, last = path.rpartition("/")
    return [f"{head}//{last}", f"{head}/./{last}", f"{head}/%2E%2E/{last}",
            f"{head}/x/../{last}", f"{head}%2F{last}"]


@pytest.fixture(autouse=True)
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """tether signs Bedrock requests with its own credentials; botocore looks nowhere else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTETHER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "tether-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Env:
    stack: Stack
    upstream: FakeToolApi

    @property
    def port(self) -> int:
        return int(self.stack.proxy_url.rsplit(":", 1)[1])

    def seen(self) -> list[str]:
        return [s.path + (f"?{s.query}" if s.query else "") for s in self.upstream.seen]

    def refusals(self) -> list[dict[str, Any]]:
        return [r for r in self.stack.audit() if r["kind"] == "request"]

    def counted(self, provider: str, status: int) -> float:
        registry = self.stack.tether.governor.metrics.registry
        return registry.get_sample_value(
            "tether_requests_total", {"provider": provider, "status": str(status)}) or 0.0


@pytest.fixture
async def env(make_stack: MakeStack) -> Env:
    upstream = FakeToolApi()  # one recorder behind every name
    names = ("openai", "azure", "anthropic", "bedrock", "gemini", "jira", "tools")
    stack = await make_stack(extra=EXTRA, upstreams=dict.fromkeys(names, upstream))
    return Env(stack, upstream)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(port: int, method: str, target: str, body: bytes = b"") -> Answer:
    """One request written byte for byte on a socket (nothing normalised on the way)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    writer.write(head.encode("latin-1") + body)
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    if headers.get("transfer-encoding") == "chunked":
        rest = _unchunk(rest)
    return Answer(int(status_line.split()[1]), headers, rest)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def message_in_shape(shape: str, answer: Answer) -> str:
    """The error message, after checking the body is what that provider's SDK reads."""
    body = answer.json()
    if shape == "openai":
        assert set(body["error"]) >= {"message", "type", "code"}
        return str(body["error"]["message"])
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"]
        return str(body["error"]["message"])
    if shape == "bedrock":
        assert answer.headers["x-amzn-errortype"]
        return str(body["message"])
    if shape == "gemini":
        assert body["error"]["code"] == answer.status and body["error"]["status"]
        return str(body["error"]["message"])
    if shape == "apis":
        assert set(body["error"]) == {"message", "rule", "rules", "code"}
        return str(body["error"]["message"])
    assert shape == "mcp" and body["jsonrpc"] == "2.0" and body["error"]["code"] < 0
    return str(body["error"]["message"])


async def refused(env: Env, target: Target, path: str, status: int) -> str:
    """Send `path`; it must be refused with `status`, shaped, audited, never forwarded."""
    before = len(env.refusals())
    url = f"{path}?{target.query}" if target.query else path
    answer = await send(env.port, target.method, url, target.body)
    assert answer.status == status, (path, answer.status, answer.body[:300])
    assert answer.headers.get("x-should-retry") == "false", path
    message = message_in_shape(target.shape, answer)
    new = env.refusals()[before:]
    assert [r["status"] for r in new] == [status], (path, new)
    assert env.upstream.seen == [], (path, env.seen())
    return message


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.method} {t.path}")
async def test_ambiguous_spellings_are_400_in_the_providers_shape(env: Env,
                                                                 target: Target) -> None:
    for path in [target.path + s for s in SUFFIXES] + infixes(target.path):
        if path.startswith(f"/bedrock/model/{BEDROCK_MODEL}%2Fconverse") \
                or path == "/mcp/tools%2Fsse":
            # One reading each: Bedrock's model ARNs carry `%2F`, so this is a model id
            # ending in "/converse" (a near-miss, 404); aiohttp reads the MCP server's
            # name decoded, and no server is named "tools/sse" (404).
            await refused(env, target, path, 404)
            continue
        message = await refused(env, target, path, 400)
        assert "ambiguous" in message, (path, message)


@pytest.mark.parametrize("target", [t for t in TARGETS if t.near_miss],
                         ids=lambda t: f"{t.method} {t.path}")
async def test_well_formed_near_misses_are_404_not_passed(env: Env, target: Target) -> None:
    await refused(env, target, target.near_miss, 404)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.method} {t.path}")
async def test_the_plain_spelling_reaches_the_upstream_byte_for_byte(env: Env,
                                                                     target: Target) -> None:
    url = f"{target.path}?{target.query}" if target.query else target.path
    await send(env.port, target.method, url, target.body)
    # The recorder is not an LLM, so a governed answer is a 502 here: what matters is
    # that the request was judged as the endpoint and arrived exactly as written.
    assert env.seen() == [upstream_of(url)]


def upstream_of(url: str) -> str:
    for prefix in ("/apis/jira", "/mcp/tools"):
        if url.startswith(prefix + "/"):
            return url[len(prefix):]
    return "/" + url.split("/", 2)[2]


@pytest.mark.parametrize("method, path, upstream_path", [
    ("GET", "/openai/v1/models", "/v1/models"),
    ("GET", "/openai/v1/models/", "/v1/models/"),
    ("GET", "/openai/v1/models/ft:gpt-4o-mini:org::abc1", "/v1/models/ft:gpt-4o-mini:org::abc1"),
    ("POST", "/openai/v1/embeddings", "/v1/embeddings"),
    ("GET", "/openai/v1/files/file-abc1/content", "/v1/files/file-abc1/content"),
    ("GET", "/openai/v1/batches/batch_abc1", "/v1/batches/batch_abc1"),
    ("GET", "/azure/openai/deployments?api-version=2024-10-21",
     "/openai/deployments?api-version=2024-10-21"),
    ("POST", "/azure/openai/deployments/d1/embeddings?api-version=2024-10-21",
     "/openai/deployments/d1/embeddings?api-version=2024-10-21"),
    ("POST", "/anthropic/v1/messages/count_tokens", "/v1/messages/count_tokens"),
    ("GET", "/anthropic/v1/models?limit=5", "/v1/models?limit=5"),
    ("POST", "/gemini/v1beta/models/gemini-2.0-flash:countTokens",
     "/v1beta/models/gemini-2.0-flash:countTokens"),
    ("POST", "/gemini/v1beta/models/gemini-2.0-flash%3AcountTokens",
     "/v1beta/models/gemini-2.0-flash%3AcountTokens"),
    ("POST", "/gemini/v1beta/models/text-embedding-004:embedContent",
     "/v1beta/models/text-embedding-004:embedContent"),
    ("GET", "/mcp/tools/caf%C3%A9", "/caf%C3%A9"),  # visible, NFC text off the LLM routes
    ("GET", "/apis/jira/rest/api/2/search?jql=project%3DOPS", "/rest/api/2/search?jql=project%3DOPS"),
    ("GET", "/mcp/tools", "/"),
])
async def test_pass_through_paths_still_pass_unchanged(env: Env, method: str, path: str,
                                                       upstream_path: str) -> None:
    answer = await send(env.port, method, path, b"{}" if method == "POST" else b"")
    assert answer.status in (200, 201) and env.seen() == [upstream_path]
    assert env.refusals() == []


async def test_a_bedrock_arn_keeps_its_escaped_slash(env: Env) -> None:
    arn = ("arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
           "us.anthropic.x-v1%3A0")
    await send(env.port, "POST", f"/bedrock/model/{arn}/converse", b'{"messages": []}')
    assert env.seen() == [f"/model/{arn}/converse"]


@pytest.mark.parametrize("path, shape", [
    ("/OpenAI/v1/chat/completions", "openai"),
    ("/openai%0A/v1/chat/completions", "openai"),
    ("//openai/v1/chat/completions", "openai"),
    ("/openai", "openai"),
    ("/anthropic./v1/messages", "anthropic"),
    ("/Anthropic/v1/messages", "anthropic"),
    ("/bedrock%20/model/m/converse", "bedrock"),
    ("/GEMINI/v1beta/models/g:generateContent", "gemini"),
    ("/%0A", "openai"),
    ("/elsewhere/v1/chat/completions", "openai"),
])
async def test_paths_under_no_prefix_are_404_in_the_resembled_shape(env: Env, path: str,
                                                                    shape: str) -> None:
    target = Target("POST", path, CHAT, shape)
    message = await refused(env, target, path, 404)
    assert "no route" in message
    [record] = env.refusals()
    assert record["code"] == "unknown_route"
    label = "unknown" if path in ("/%0A", "/elsewhere/v1/chat/completions") else shape
    assert env.counted(label, 404) == 1


async def test_an_encoded_prefix_is_400(env: Env) -> None:
    target = Target("POST", "/open%61i/v1/chat/completions", CHAT, "openai")
    assert "prefix is percent-encoded" in await refused(env, target, target.path, 400)
    assert env.counted("openai", 400) == 1


async def test_an_apis_case_variant_is_not_an_operation(env: Env) -> None:
    answer = await send(env.port, "GET", "/apis/jira/rest/api/2/ISSUE/OPS-1")
    assert answer.status == 403 and env.upstream.seen == []


@pytest.mark.parametrize("line", [
    b"GET /openai/v1/models\t HTTP/1.1",        # a raw tab
    b"GET /openai/v1/mod\x7fels HTTP/1.1",      # a raw DEL
    b"GET /openai/v1/mod\xc3\xa9ls HTTP/1.1",   # raw UTF-8
])
async def test_raw_bytes_the_http_parser_refuses_never_reach_a_route(env: Env,
                                                                     line: bytes) -> None:
    """aiohttp's HTTP parser answers these 400 (plain text) before any route runs: the
    one refusal not in a provider's shape (docs/hardening.md); nothing is forwarded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.0 400") or raw.startswith(b"HTTP/1.1 400")
    assert env.upstream.seen == []
