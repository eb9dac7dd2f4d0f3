"""A fake Bedrock runtime (Converse API) that speaks the real wire format and checks SigV4.

    POST /model/{modelId}/converse          JSON, toolUse content blocks
    POST /model/{modelId}/converse-stream   application/vnd.amazon.eventstream
    POST /model/{modelId}/invoke[-with-response-stream]
                                            Anthropic bodies (fake_bedrock_invoke.py)

Every request must carry a valid SigV4 signature (service `bedrock`) made with
the one key pair the fake was given; the fake recomputes it with botocore from
the bytes it received, so a test through tether proves tether signed the
request itself, with its own credentials, over exactly what it forwarded.

Answers use fake_base's `Reply` / `Call` / `RawReply`: a Reply's
`finish_reason`, when set, is sent verbatim as the `stopReason`. Tool inputs
are written into the JSON body as the Call's argument text, byte for byte, so
tests can send odd spacing or duplicate keys. Streams are written one frame
per write, input text cut into fragments of a few characters, with the `p`
padding field the real service adds to every event.
"""

from __future__ import annotations

import datetime
import hmac
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ..providers.eventstream import encode, event
from .fake_base import Body, Call, RawReply, Reply, ScriptedFake, pieces, send_raw, write_stream
from .fake_bedrock_invoke import HEADERS as INVOKE_HEADERS
from .fake_bedrock_invoke import invoke_body, invoke_frames, invoke_problem
from .fake_history import bedrock_problem

type Turn = Reply | RawReply
type Script = Callable[[Body], Turn]

SERVICE = "bedrock"
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/,]+)/(\d{8})/([^/,]+)/([^/,]+)/aws4_request,"
                   r"\s*SignedHeaders=([^,]+),\s*Signature=([0-9a-f]{64})$")
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def stop_reason(reply: Reply) -> str:
    return reply.finish_reason or ("tool_use" if reply.calls else "end_turn")


def tool_use_id(call: Call, n: int) -> str:
    return call.id or f"tooluse_{n:022d}"


def converse_body(reply: Reply, usage: tuple[int, int] = (24, 12)) -> bytes:
    """A Converse answer. Each input is the Call's argument text, spliced in verbatim."""
    content: list[object] = [{"text": reply.content}] if reply.content else []
    marks = []
    for i, call in enumerate(reply.calls):
        mark = f"@@input-{i}@@"
        marks.append((json.dumps(mark), call.arguments or "{}"))
        content.append({"toolUse": {"toolUseId": tool_use_id(call, i), "name": call.name,
                                    "input": mark}})
    body = json.dumps({
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop_reason(reply),
        "usage": {"inputTokens": usage[0], "outputTokens": usage[1],
                  "totalTokens": usage[0] + usage[1]},
        "metrics": {"latencyMs": 321},
    }, ensure_ascii=False)
    for mark, raw in marks:
        body = body.replace(mark, raw, 1)
    return body.encode("utf-8")


def stream_frames(reply: Reply, *, fragment: int = 3, usage: tuple[int, int] = (24, 12)
                  ) -> list[bytes]:
    """The frames of a streamed answer, one encoded message per element."""
    frames: list[bytes] = []

    def emit(event_type: str, payload: Body) -> None:
        payload = {**payload, "p": _PADDING[:len(frames) % len(_PADDING) + 1]}
        frames.append(encode(event(event_type, json.dumps(payload, ensure_ascii=False,
                                                          separators=(",", ":")).encode())))

    emit("messageStart", {"role": "assistant"})
    index = 0
    if reply.content:
        for piece in pieces(reply.content, 4):
            emit("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
        emit("contentBlockStop", {"contentBlockIndex": 0})
        index = 1
    for i, call in enumerate(reply.calls):
        emit("contentBlockStart", {"contentBlockIndex": index, "start": {
            "toolUse": {"toolUseId": tool_use_id(call, i), "name": call.name}}})
        for piece in pieces(call.arguments, fragment):
            emit("contentBlockDelta", {"contentBlockIndex": index,
                                       "delta": {"toolUse": {"input": piece}}})
        emit("contentBlockStop", {"contentBlockIndex": index})
        index += 1
    emit("messageStop", {"stopReason": stop_reason(reply)})
    emit("metadata", {"usage": {"inputTokens": usage[0], "outputTokens": usage[1],
                                "totalTokens": usage[0] + usage[1]},
                      "metrics": {"latencyMs": 321}})
    return frames


def verify_sigv4(method: str, url: str, headers: Mapping[str, str], body: bytes, *,
                 access_key: str, secret_key: str, region: str,
                 now: datetime.datetime | None = None) -> str | None:
    """Why the request's SigV4 signature is not valid for these credentials, or None.

    The signature is recomputed with botocore from the received method, raw URL,
    the headers the signer named and the body.
    """
    auth = headers.get("Authorization", "")
    m = _AUTH.match(auth)
    if not m:
        return "MissingAuthenticationTokenException: no SigV4 Authorization header"
    key, day, scope_region, service, signed, signature = m.groups()
    if key != access_key:
        return f"UnrecognizedClientException: unknown access key {key!r}"
    if (scope_region, service) != (region, SERVICE):
        return f"InvalidSignatureException: signed for {scope_region}/{service}"
    stamp = headers.get("X-Amz-Date", "")
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "InvalidSignatureException: no valid X-Amz-Date"
    now = now or datetime.datetime.now(datetime.UTC)
    if abs((now - when).total_seconds()) > 300 or stamp[:8] != day:
        return "InvalidSignatureException: signature expired or dated wrongly"
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return "InvalidSignatureException: host and x-amz-date must be signed"
    if any(n not in headers for n in names):
        return "InvalidSignatureException: a signed header is missing"
    request = AWSRequest(method=method, url=url, data=body,
                         headers={n: headers[n] for n in names})
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(access_key, secret_key), SERVICE, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)),
                                request)
    if not hmac.compare_digest(str(expected), signature):
        return "InvalidSignatureException: the request signature does not match"
    return None


def error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status,
                             headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/"
                                                          "coral/com.amazon.bedrock/"})


@dataclass
class FakeBedrock(ScriptedFake[Turn]):
    """The fake server. Push turns onto `turns`, or give a `script`."""

    access_key: str = "AKIDTETHERFAKE"
    secret_key: str = "tether-fake-secret"
    region: str = "us-east-1"
    fragment: int = 3
    models: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.headers.append(dict(request.headers))
        why = verify_sigv4(request.method, f"http://{request.host}{request.raw_path}",
                           request.headers, body, access_key=self.access_key,
                           secret_key=self.secret_key, region=self.region)
        if why is not None:
            self.rejected.append(why)
            kind, _, message = why.partition(": ")
            return error(403, kind, message)
        m = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream|invoke"
                         r"|invoke-with-response-stream)", request.rel_url.raw_path)
        if request.method != "POST" or m is None:
            return error(404, "UnknownOperationException", f"no operation at {request.raw_path}")
        try:
            parsed = json.loads(body)
        except ValueError:
            return error(400, "ValidationException", "the request body is not JSON")
        self.requests.append(parsed)
        model, operation = unquote(m.group(1)), m.group(2)
        self.models.append(model)
        invoke = operation.startswith("invoke")
        problem = invoke_problem(parsed) if invoke else bedrock_problem(parsed)
        if problem is not None:
            return error(400, "ValidationException", problem)
        turn = self._next(parsed)
        if isinstance(turn, RawReply):
            return await send_raw(request, turn)
        rid = {"x-amzn-RequestId": str(uuid.uuid4())}
        if operation == "converse":
            return web.Response(body=converse_body(turn),
                                headers={**rid, "Content-Type": "application/json"})
        if operation == "invoke":
            return web.Response(body=invoke_body(turn, model),
                                headers={**rid, **INVOKE_HEADERS,
                                         "Content-Type": "application/json"})
        frames = invoke_frames(turn, model, fragment=self.fragment) if invoke \
            else stream_frames(turn, fragment=self.fragment)
        return await write_stream(request, frames,
                                  {**rid, "Content-Type": "application/vnd.amazon.eventstream"})
