"""Reading what a batch would run (`proxy.providers.batch_input`) and classifying batch
paths (`batch_routes`), without a server."""

from __future__ import annotations

import json
import time

import pytest

from proxy.errors import BadRequest
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.azure import AzureProvider
from proxy.providers.base import BatchStep, RouteKind
from proxy.providers.batch_input import (
    anthropic_requests,
    batch_upload,
    openai_input,
    openai_input_file_id,
)
from proxy.providers.openai import OpenAIProvider

TOOL = {"type": "function", "function": {"name": "delete_volume", "parameters": {}}}


def line(custom_id: str, body: dict[str, object], url: str = "/v1/chat/completions") -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": body}).encode()


@pytest.mark.parametrize("body, url, declares", [
    ({"model": "m", "messages": []}, "/v1/chat/completions", False),
    ({"model": "m", "messages": [], "tools": []}, "/v1/chat/completions", False),
    ({"model": "m", "messages": [], "tools": None}, "/v1/chat/completions", False),
    ({"model": "m", "messages": [], "tools": [TOOL]}, "/v1/chat/completions", True),
    ({"model": "m", "messages": [], "functions": [{"name": "f"}]}, "/v1/chat/completions", True),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "/v1/responses", True),
    ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "/v1/responses", True),
    ({"model": "m", "prompt": "a completion prompt"}, "/v1/completions", False),
    ({"model": "m", "input": "x"}, "/v1/embeddings", False),
    ({"model": "m", "messages": [], "tools": {}}, "/v1/chat/completions", True),  # not [] or null
])
def test_which_openai_requests_declare_tools(body: dict[str, object], url: str,
                                             declares: bool) -> None:
    read = openai_input(line("a", body, url) + b"\n")
    assert (read.total, read.with_tools) == (1, int(declares))


def test_an_input_file_counts_and_names_the_requests_with_tools() -> None:
    lines = [line(f"r{i}", {"model": "m", "messages": [], **({"tools": [TOOL]} if i % 2 else {})})
             for i in range(10)]
    read = openai_input(b"\r\n".join(lines) + b"\n\n")
    assert (read.total, read.with_tools, read.examples) == (10, 5, ("r1", "r3", "r5"))


@pytest.mark.parametrize("data, needle", [
    (b'{"custom_id": "a", "body": {}', "line 1 of the batch input file is not valid JSON"),
    (b'{"custom_id": "a", "body": {"tools": [], "tools": [1]}}', "duplicate key"),
    (b'["not", "an", "object"]', "must be a JSON object"),
    (b'{"custom_id": "a", "url": "/v1/chat/completions"}', "has no 'body' object"),
    (b'{"custom_id": "a", "body": {"x": NaN}}', "not valid JSON"),
    (b'{"custom_id": "a", "body": {"x": "\\ud800"}}', "surrogate"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_unreadable_input_is_refused(data: bytes, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        openai_input(data)


@pytest.mark.parametrize("params, declares", [
    ({"model": "m", "max_tokens": 5, "messages": []}, False),
    ({"model": "m", "max_tokens": 5, "messages": [], "tools": []}, False),
    ({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "t"}]}, True),
    ({"model": "m", "max_tokens": 5, "messages": [],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, True),
    ({"model": "m", "max_tokens": 5, "messages": [], "mcp_servers": [{"url": "x"}]}, True),
])
def test_which_anthropic_requests_declare_tools(params: dict[str, object], declares: bool) -> None:
    body = json.dumps({"requests": [{"custom_id": "a", "params": params}]}).encode()
    assert anthropic_requests(body).with_tools == int(declares)


@pytest.mark.parametrize("body, needle", [
    (b'{"requests": {}}', "'requests' must be an array"),
    (b'{"requests": [{"custom_id": "a"}]}', "must be an object with a 'params' object"),
    (b'{"requests": [], "requests": []}', "duplicate key"),
])
def test_unreadable_anthropic_batches_are_refused(body: bytes, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        anthropic_requests(body)


@pytest.mark.parametrize("body, needle", [
    (b'{"input_file_id": "../x", "endpoint": "/v1/chat/completions"}', "must name an uploaded"),
    (b'{"endpoint": "/v1/chat/completions"}', "must name an uploaded"),
    (b'{"input_blob": "https://x.blob.core.windows.net/b/in.jsonl"}', "storage blob"),
])
def test_the_input_file_id_must_be_a_plain_id(body: bytes, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        openai_input_file_id(body)
    assert openai_input_file_id(b'{"input_file_id": "file-abc_1"}') == "file-abc_1"


def multipart(*parts: tuple[str, bytes, str]) -> tuple[str, bytes]:
    out = b""
    for name, value, extra in parts:
        out += (f"--B\r\nContent-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n".encode()
                + value + b"\r\n")
    return "multipart/form-data; boundary=B", out + b"--B--\r\n"


def test_a_batch_upload_yields_its_file() -> None:
    ctype, body = multipart(("purpose", b"batch", ""), ("file", b"LINES", '; filename="a"'))
    assert batch_upload(ctype, body) == b"LINES"
    ctype, body = multipart(("purpose", b"assistants", ""), ("file", b"x", '; filename="a"'))
    assert batch_upload(ctype, body) is None
    assert batch_upload("application/json", b"{}") is None


@pytest.mark.parametrize("parts, needle", [
    ((("purpose", b"batch", ""), ("purpose", b"assistants", "")), "more than once"),
    ((("purpose", b"batch", ""),), "exactly one 'file'"),
    ((("purpose", b"batch", ""), ("file", b"a", ""), ("file", b"b", "")), "exactly one 'file'"),
])
def test_ambiguous_uploads_are_refused(parts: tuple[tuple[str, bytes, str], ...],
                                       needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        batch_upload(*multipart(*parts))


def test_a_transfer_encoded_part_is_refused() -> None:
    body = (b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\ne30=\r\n--B--\r\n")
    with pytest.raises(BadRequest, match="Transfer-Encoding"):
        batch_upload("multipart/form-data; boundary=B", body)


@pytest.mark.parametrize("provider, method, path, step", [
    (OpenAIProvider(), "POST", "v1/batches", BatchStep.CREATE_FROM_FILE),
    (OpenAIProvider(), "GET", "v1/batches", BatchStep.MANAGE),
    (OpenAIProvider(), "GET", "v1/batches/batch_1", BatchStep.MANAGE),
    (OpenAIProvider(), "POST", "v1/batches/batch_1/cancel", BatchStep.MANAGE),
    (OpenAIProvider(), "POST", "v1/files", BatchStep.UPLOAD),
    (AzureProvider(), "POST", "openai/batches", BatchStep.CREATE_FROM_FILE),
    (AzureProvider(), "POST", "openai/v1/batches", BatchStep.CREATE_FROM_FILE),
    (AzureProvider(), "POST", "openai/files", BatchStep.UPLOAD),
    (AnthropicProvider(), "POST", "v1/messages/batches", BatchStep.CREATE_INLINE),
    (AnthropicProvider(), "GET", "v1/messages/batches/msgbatch_1/results", BatchStep.MANAGE),
    (AnthropicProvider(), "DELETE", "v1/messages/batches/msgbatch_1", BatchStep.MANAGE),
])
def test_batch_steps(provider: OpenAIProvider | AzureProvider | AnthropicProvider, method: str,
                     path: str, step: BatchStep) -> None:
    route = provider.route(method, path, {})
    assert (route.kind, route.batch, route.upstream_path) == (RouteKind.BATCH, step, path)


@pytest.mark.parametrize("provider, method, path", [
    (OpenAIProvider(), "POST", "v1/batches/"),
    (OpenAIProvider(), "POST", "v1/Batches"),
    (OpenAIProvider(), "POST", "batches"),            # an upstream with its own /v1
    (OpenAIProvider(), "POST", "v2/batches"),
    (OpenAIProvider(), "POST", "v1/batches/batch_1"),
    (OpenAIProvider(), "DELETE", "v1/batches/batch_1"),
    (OpenAIProvider(), "GET", "v1/batches/batch_1/cancel"),
    (AzureProvider(), "POST", "openai/deployments/d/batches"),
    (AnthropicProvider(), "POST", "v1/messages/batches/"),
    (AnthropicProvider(), "POST", "v1/Messages/Batches"),
    (AnthropicProvider(), "POST", "v1/batches"),
    (AnthropicProvider(), "PUT", "v1/messages/batches/msgbatch_1"),
])
def test_other_batch_spellings_are_404(provider: OpenAIProvider | AzureProvider |
                                       AnthropicProvider, method: str, path: str) -> None:
    route = provider.route(method, path, {})
    assert (route.kind, route.status) == (RouteKind.REFUSE, 404)
    assert "batch endpoint" in route.message


def test_other_file_paths_pass() -> None:
    for method, path in (("GET", "v1/files"), ("GET", "v1/files/file-1/content"),
                         ("POST", "v1/vector_stores/vs_1/files"),
                         ("POST", "v1/vector_stores/vs_1/file_batches")):
        assert OpenAIProvider().route(method, path, {}).kind is RouteKind.PASS


FORM = "multipart/form-data; boundary=B"
PURPOSE = b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
FILE = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nLINES\r\n'


@pytest.mark.parametrize("ctype, body, needle", [
    ("multipart/form-data", PURPOSE + FILE + b"--B--\r\n", "exactly one boundary"),
    ("multipart/form-data; boundary=B; boundary=C", PURPOSE + FILE + b"--B--", "one boundary"),
    (FORM, b"preamble\r\n" + PURPOSE + FILE + b"--B--", "does not start with its boundary"),
    (FORM, PURPOSE.replace(b"\r\n", b"\n") + FILE + b"--B--", "not followed by CRLF"),
    (FORM, PURPOSE + FILE, "no close delimiter"),
    (FORM, PURPOSE + FILE + b"--B--\r\nmore", "bytes follow the close delimiter"),
    (FORM, b"--B\r\nX-Other: 1\r\n\r\nbatch\r\n" + FILE + b"--B--", "exactly one Content-Disp"),
    (FORM, PURPOSE.replace(b'name="purpose"', b"name*=utf-8''purpose") + FILE + b"--B--",
     "repeats or encodes 'name*'"),
    (FORM, PURPOSE.replace(b'name="purpose"', b'name="purpose"; name="file"') + FILE + b"--B--",
     "repeats or encodes 'name'"),
    (FORM, PURPOSE.replace(b'name="purpose"', b'name="pur\\"pose"') + FILE + b"--B--",
     "not form-data with a name"),
    (FORM, PURPOSE + FILE * 16 + b"--B--", "more than 16 parts"),
    (FORM, b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\nLINES\r\n--B--",
     "no blank line"),
])
def test_multipart_bodies_with_two_readings_are_refused(ctype: str, body: bytes,
                                                         needle: str) -> None:
    with pytest.raises(BadRequest, match="malformed") as info:
        batch_upload(ctype, body)
    assert needle in info.value.message


def test_a_purpose_in_another_case_is_still_read_as_batch() -> None:
    body = PURPOSE.replace(b"batch", b" Batch ") + FILE + b"--B--\r\n"
    assert batch_upload(FORM, body) == b"LINES"


def test_reading_an_upload_of_only_line_ends_is_fast() -> None:
    for filler in (b"\n", b"\r", b"\r\n"):
        body = PURPOSE + FILE.replace(b"LINES", filler * 5_000_000) + b"--B--\r\n"
        started = time.perf_counter()
        assert batch_upload(FORM, body) is not None
        assert time.perf_counter() - started < 0.5
