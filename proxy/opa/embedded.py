"""Embedded Rego: the policy evaluated in-process by rego-cpp (the `regopy` package).

Why rego-cpp: `regorus` (the Rust engine) is not installable on this machine's
package index; regopy 1.5.2 ships a prebuilt rego-cpp. Its answers go through
the same `proxy.policy.opa.interpret` as the remote Data API's.

Compile once, evaluate cheaply: the modules are compiled into a bundle for the
one decision query at load, and each decision only sets the input and runs the
bundle (about 0.1-0.4 ms for rules/opa/tether.rego on this machine; an
unbundled `query` re-compiles and costs ~1.5 ms).

Threading: an Interpreter holds its input as state (set, then query), so it is
not safe to share between threads; and a query, however cheap usually, is
arbitrary policy code that cannot be interrupted. So every evaluation runs on
one dedicated worker thread (a single-worker executor: evaluations are
serialised without a lock, and never occupy the loop's default executor).
ctypes releases the GIL during the C++ call, so the event loop keeps serving
other agents while a query runs, and the caller's timeout applies to embedded
queries exactly as to remote ones (a query past it is a deny; the worker
finishes it in the background). The cost of the hop is ~0.2 ms per query.

Known rego-cpp behaviours handled here: asking an undefined result for a
binding aborts the process (a C++ exception), so "undefined" is recognised
from the output text instead; an evaluation error (a conflict between complete
rules, a failing built-in) is an output that is not ok, and is never turned
into text (that can segfault). rego-cpp 1.5.2 also fails `with input as {...}`
over rules that depend on other input-dependent rules (an error, not a wrong
answer); decisions never use `with`, and rules/opa/tether_test.rego calls the
policy's function instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from regopy import Interpreter, LogLevel, Output, RegoError

from ..policy.opa import Defined, Failed, Reply, Undefined, parse_json

log = logging.getLogger("tether.opa")
_ERROR = re.compile(r"\(error \d+:([^|\s]*)\|(\d+)\|\d+\s*\(errormsg \d+:([^)]*)\)")


class RegoLoadError(Exception):
    """A module or data.json that rego-cpp cannot load or compile."""


def describe(e: RegoError, sources: dict[str, str]) -> str:
    """rego-cpp's error (an s-expression) as `file:line: message` lines."""
    found = []
    for name, offset, message in _ERROR.findall(str(e)):
        text = sources.get(name)
        line = text.count("\n", 0, int(offset)) + 1 if text is not None else None
        found.append(f"{name}:{line}: {message.strip()}" if line else message.strip())
    return "; ".join(dict.fromkeys(found)) or str(e).strip()


def new_interpreter(modules: Sequence[tuple[str, str]], data: str | None) -> Interpreter:
    rego = Interpreter()
    rego.log_level = LogLevel.NONE
    sources = dict(modules)
    try:
        if data is not None:
            rego.add_data_json(data)
        for name, text in modules:
            rego.add_module(name, text)
    except RegoError as e:
        raise RegoLoadError(f"Rego does not compile: {describe(e, sources)}") from e
    return rego


def reply_of(out: Output) -> Reply:
    """A rego-cpp output (`{"expressions":[true], "bindings":{"x": ...}}`) as a Reply.
    An output that is not ok is never turned into text: regopy 1.5.2 can crash the
    process (a segfault in regoOutputJSON) on some error outputs."""
    if not out.ok():
        return Failed("eval", "the embedded policy failed to evaluate (a conflict, a "
                      "built-in error, or a construct rego-cpp does not support)")
    text = str(out)
    if text.strip() == "undefined":
        return Undefined()
    try:
        out = parse_json(text)
    except ValueError as e:
        return Failed("bad_json", f"the engine's output is not JSON ({e})")
    if isinstance(out, list):
        if len(out) != 1:
            return Failed("bad_result", f"the query has {len(out)} results, not one")
        out = out[0]
    bindings = out.get("bindings") if isinstance(out, dict) else None
    if not isinstance(bindings, dict) or "x" not in bindings:
        return Undefined()
    return Defined(bindings["x"])


class _Engine:
    """One interpreter, its compiled bundle, and the one thread that may touch them."""

    def __init__(self, modules: Sequence[tuple[str, str]], data: str | None, path: str) -> None:
        self._rego = new_interpreter(modules, data)
        query = "x = data." + path.replace("/", ".")
        try:
            self._bundle = self._rego.build(query)
        except RegoError as e:
            raise RegoLoadError(f"Rego does not compile: {describe(e, dict(modules))}") from e
        if not self._bundle.ok():
            raise RegoLoadError(f"Rego does not compile for the query {query!r}")
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-rego")

    def evaluate(self, document: str) -> Reply:
        """One decision (blocking; runs on the worker thread). `document`: the input as JSON."""
        try:
            self._rego.set_input_term(document)
            out = self._rego.query_bundle(self._bundle)
        except RegoError as e:
            return Failed("eval", f"the embedded engine refused the query: {str(e)[:200]}")
        return reply_of(out)


class EmbeddedOpa:
    """The decision rule of a compiled policy, evaluated on a dedicated thread.

    A query that runs past the caller's timeout (a policy whose cost grows with the
    agent's arguments) cannot be stopped, and would hold the thread while every later
    decision queued behind it and timed out too. So the engine it holds is retired:
    it finishes that query on its own thread and is dropped, and later decisions go
    to a fresh engine. At most MAX_RETIRED such queries run at once; past that,
    decisions wait (and deny on timeout) until one ends, so an agent cannot turn
    the policy into a thread and a CPU core per request."""

    MAX_RETIRED = 2

    def __init__(self, modules: Sequence[tuple[str, str]], data: str | None, path: str) -> None:
        self.path = path
        self._source = (tuple(modules), data)
        self._engine = _Engine(modules, data, path)
        self._retired: list[Future[Reply]] = []

    def evaluate(self, document: str) -> Reply:
        """One decision, blocking, on the calling thread (tests and `tether opa-test`)."""
        return self._engine.evaluate(document)

    async def query(self, document: str) -> Reply:
        engine = self._engine
        job = engine.worker.submit(engine.evaluate, document)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # the caller's timeout
            if job.running():
                self._retire(engine, job)
            raise

    def _retire(self, engine: _Engine, job: Future[Reply]) -> None:
        if engine is not self._engine:
            return  # already replaced by another overrun
        self._retired = [j for j in self._retired if not j.done()]
        if len(self._retired) >= self.MAX_RETIRED:
            log.error("embedded OPA: %d queries ran past the timeout and are still running; "
                      "decisions deny until one ends", len(self._retired) + 1)
            return
        modules, data = self._source
        self._engine = _Engine(modules, data, self.path)  # compiled at load: ~5 ms
        self._retired.append(job)
        engine.worker.shutdown(wait=False)  # its thread ends with the overrun query
        log.warning("embedded OPA: a query ran past the timeout; it finishes on its own "
                    "thread, and later decisions use a fresh engine")

    def close(self) -> None:
        self._engine.worker.shutdown(wait=False, cancel_futures=True)
