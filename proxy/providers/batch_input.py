"""What a batch would run, read from its input: how many requests, and which declare tools.

A request *declares tools* when its body could make the model call one that
tether would have to judge: a non-empty `tools` (custom and hosted tools alike)
or legacy `functions` (OpenAI), a stored `prompt` on the Responses API (a
stored prompt can carry tools tether cannot see), a non-empty `mcp_servers`
(Anthropic). Anything tether cannot read unambiguously (not JSON, duplicate
keys, a line that is not an object, a multipart body that names its purpose
twice) is refused: a batch is never let through on a guess.

    openai_input(jsonl)            an OpenAI/Azure batch input file
    anthropic_requests(body)       an Anthropic `POST v1/messages/batches` body
    openai_input_file_id(body)     the file an OpenAI/Azure `POST .../batches` names
    batch_upload(ctype, body)      the file of a `purpose=batch` upload, else None
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import strict_json
from ..errors import BadRequest
from .multipart import is_form_data, read_form

_FILE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
EXAMPLES = 3  # request ids named in a refusal


@dataclass(frozen=True, slots=True)
class BatchRequests:
    total: int
    with_tools: int
    examples: tuple[str, ...] = ()  # custom_ids (or line numbers) of requests with tools


def openai_input(jsonl: bytes) -> BatchRequests:
    """Every line of an input file: `{"custom_id", "method", "url", "body"}`."""
    total, with_tools, examples = 0, 0, list[str]()
    for number, line in enumerate(jsonl.split(b"\n"), start=1):
        if not line.strip():
            continue
        total += 1
        entry = _object(line, f"line {number} of the batch input file")
        body = entry.get("body")
        if not isinstance(body, dict):
            raise BadRequest(f"line {number} of the batch input file has no 'body' object")
        url = entry.get("url")
        responses = isinstance(url, str) and url.rstrip("/").endswith("responses")
        if _declares(body, ("tools", "functions")) or (responses and "prompt" in body):
            with_tools += 1
            if len(examples) < EXAMPLES:
                examples.append(_name(entry, f"line {number}"))
    return BatchRequests(total, with_tools, tuple(examples))


def anthropic_requests(body: bytes) -> BatchRequests:
    """`{"requests": [{"custom_id", "params": {messages.create params}}]}`."""
    obj = _object(body, "the request body")
    requests = obj.get("requests")
    if not isinstance(requests, list):
        raise BadRequest("'requests' must be an array")
    with_tools, examples = 0, list[str]()
    for i, request in enumerate(requests):
        params = request.get("params") if isinstance(request, dict) else None
        if not isinstance(request, dict) or not isinstance(params, dict):
            raise BadRequest(f"requests[{i}] must be an object with a 'params' object")
        if _declares(params, ("tools", "mcp_servers")):
            with_tools += 1
            if len(examples) < EXAMPLES:
                examples.append(_name(request, f"requests[{i}]"))
    return BatchRequests(len(requests), with_tools, tuple(examples))


def openai_input_file_id(body: bytes) -> str:
    obj = _object(body, "the request body")
    if "input_blob" in obj:
        raise BadRequest("a batch whose input is a storage blob ('input_blob') cannot be read "
                         "by tether; upload the input file and name it in 'input_file_id'")
    file_id = obj.get("input_file_id")
    if not isinstance(file_id, str) or _FILE_ID.fullmatch(file_id) is None:
        raise BadRequest("'input_file_id' must name an uploaded file (letters, digits, '-', '_')")
    return file_id


def batch_upload(content_type: str, body: bytes) -> bytes | None:
    """The file of a multipart upload whose `purpose` is `batch` (in any case or
    padding an upstream might accept); None for any other upload. A body tether
    cannot read plainly (`multipart.read_form`), a purpose given twice or a file
    given twice is refused."""
    if not is_form_data(content_type):
        return None
    parts = read_form(content_type, body)
    purposes = [p.data for p in parts if p.name == "purpose"]
    if len(purposes) > 1:
        raise BadRequest("the upload names its 'purpose' more than once")
    if not purposes or purposes[0].strip().lower() != b"batch":
        return None
    files = [p.data for p in parts if p.name == "file"]
    if len(files) != 1:
        raise BadRequest("a batch input upload must carry exactly one 'file'")
    return files[0]


def _declares(body: dict[str, object], keys: tuple[str, ...]) -> bool:
    return any(body.get(k) not in (None, []) for k in keys)


def _name(entry: dict[str, object], fallback: str) -> str:
    custom_id = entry.get("custom_id")
    return custom_id[:100] if isinstance(custom_id, str) else fallback


def _object(data: bytes, what: str) -> dict[str, object]:
    try:
        value = strict_json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value
