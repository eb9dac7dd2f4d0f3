"""Batch API steps on the LLM routes, judged by `upstreams.NAME.batches` before they go on.

A batch runs at the provider and its results come back in a file that tether
does not read or rewrite, so no tool call in it could be decided. Instead:

- `refuse_tools` (the default): a batch any of whose requests declares tools is
  refused (501), in the provider's shape, audited. OpenAI and Azure: when the
  batch is created, tether reads its input file back from the upstream (an
  uploaded file cannot change, so what was read is what runs); an upload with
  `purpose=batch` is also read as it passes, to refuse it early. Anthropic: the
  requests are in the creating body. A batch without tools (embeddings, plain
  chat) is forwarded and audited as kind `batch`; list, retrieve, cancel,
  delete and results pass.
- `refuse`: every batch step (and a `purpose=batch` upload) is refused (501).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from yarl import URL

from ..audit.log import AuditWriteError
from ..auth.authenticator import Identity
from ..config import Upstream
from ..errors import BadRequest, NotGoverned, PayloadTooLarge, TetherError, UpstreamError
from ..ids import new_id
from ..providers.base import BatchStep, Provider, Route
from ..providers.batch_input import (
    BatchRequests,
    anthropic_requests,
    batch_upload,
    openai_input,
    openai_input_file_id,
)
from ..upstreams import BatchMode
from .context import Context
from .errors import status_and_code
from .upstream import forward_headers, forward_query, read_at_most, read_body

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("tether.server")

Forward = Callable[[bytes], Awaitable[web.StreamResponse]]


class BatchGate:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def handle(self, request: web.Request, provider: Provider, upstream: Upstream,
                     route: Route, who: Identity, ssl: ssl.SSLContext | bool,
                     forward: Forward) -> web.StreamResponse:
        """`forward(body)` sends the request on unchanged once it is judged."""
        governor = self.ctx.governor
        rid = new_id()
        trust = self.ctx.config.trust_identity_headers
        session = (request.headers.get("x-tether-session") if trust else None) or None
        try:
            body = await read_body(request, self.ctx.config.max_body_bytes)
            read = await self._judge(request, provider, upstream, route, who, body, ssl)
        except TetherError as e:
            status, code = status_and_code(e)
            governor.reject(provider=provider.name, status=status, code=code, message=str(e),
                            request_id=rid, session=session, agent=who.agent,
                            endpoint=route.upstream_path)
            governor.metrics.requests.labels(provider.name, str(status)).inc()
            raise
        if read is not None and route.batch is not None:
            try:  # what will run is recorded; a lost record is logged and counted
                governor.audit.write({
                    "kind": "batch", "request_id": rid, "provider": provider.name,
                    "endpoint": route.upstream_path, "step": route.batch.value,
                    "session": session, "agent": who.agent, "requests": read.total,
                    "with_tools": read.with_tools, "policy_revision": governor.engine.revision})
            except AuditWriteError:
                log.exception("audit write failed for a batch")
                governor.metrics.audit_write_errors.inc()
        return await forward(body)

    async def _judge(self, request: web.Request, provider: Provider, upstream: Upstream,
                     route: Route, who: Identity, body: bytes,
                     ssl: ssl.SSLContext | bool) -> BatchRequests | None:
        """The requests a batch step would run, once judged; None: nothing to record."""
        step, refuse = route.batch, upstream.batches is BatchMode.REFUSE
        if step is BatchStep.MANAGE:
            if refuse:
                raise _refused(request, provider, upstream, route)
            return None
        # An input may be tens of megabytes of JSON lines: read in a worker thread, so
        # the event loop keeps answering everyone else meanwhile.
        if step is BatchStep.UPLOAD:
            data = batch_upload(request.headers.get("content-type", ""), body)
            if data is None:
                return None  # not a batch's input: another purpose
            if refuse:
                raise _refused(request, provider, upstream, route)
            return _without_tools(await asyncio.to_thread(openai_input, data), upstream,
                                  "batch input file")
        if refuse:
            raise _refused(request, provider, upstream, route)
        if step is BatchStep.CREATE_INLINE:
            return _without_tools(await asyncio.to_thread(anthropic_requests, body), upstream,
                                  "batch")
        file_id = openai_input_file_id(body)
        data = await self._input_file(request, upstream, route, who, file_id, ssl)
        return _without_tools(await asyncio.to_thread(openai_input, data), upstream, "batch")

    async def _input_file(self, request: web.Request, upstream: Upstream, route: Route,
                          who: Identity, file_id: str, ssl: ssl.SSLContext | bool) -> bytes:
        """The input file as the upstream holds it, with the same credentials the
        batch request itself will carry upstream."""
        query = forward_query(who.query(request.rel_url.raw_query_string), upstream)
        url = f"{upstream.url}/{route.files_path}/{file_id}/content"
        headers = forward_headers(request.headers, upstream, drop=who.drop_headers)
        headers.popall("content-type", None)
        limit = self.ctx.config.max_response_bytes
        try:
            async with self.ctx.client.get(URL(f"{url}?{query}" if query else url, encoded=True),
                                           headers=headers, ssl=ssl) as resp:
                if resp.status >= 500:
                    raise UpstreamError(f"the upstream answered {resp.status} when tether read "
                                        f"the batch input file {file_id!r}")
                if resp.status != 200:
                    raise BadRequest(f"tether could not read the batch input file {file_id!r} "
                                     f"(the upstream answered {resp.status}), so the batch was "
                                     "not created")
                data = await read_at_most(resp, limit + 1)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamError("the upstream could not be reached to read the batch input "
                                f"file: {type(e).__name__}") from e
        if len(data) > limit:
            raise PayloadTooLarge(f"the batch input file is over the {limit}-byte limit "
                                  "(limits.max_response_bytes); tether cannot read it whole, so "
                                  "the batch was not created")
        return data


def _refused(request: web.Request, provider: Provider, upstream: Upstream,
             route: Route) -> NotGoverned:
    return NotGoverned(
        f"{request.method} /{provider.name}/{route.upstream_path}: batches are refused "
        f"(upstreams.{upstream.name}.batches: refuse), since tether cannot decide the tool "
        "calls in a batch's results")


def _without_tools(read: BatchRequests, upstream: Upstream, what: str) -> BatchRequests:
    if not read.with_tools:
        return read
    named = ", ".join(repr(e) for e in read.examples)
    raise NotGoverned(
        f"{read.with_tools} of the {read.total} requests in this {what} declare tools "
        f"(first: {named}); tether cannot decide the tool calls in a batch's results, so a "
        f"batch that declares tools is refused (upstreams.{upstream.name}.batches: "
        "refuse_tools). Send those requests one at a time, where every tool call is governed.")
