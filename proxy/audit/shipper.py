"""Ships the audit log to its sinks, off the hot path, and gates the log when shipping lags.

One task per sink reads the local files from that sink's cursor (spool.py), sends a
batch, and only then moves and persists the cursor; a failed batch is sent again,
after an exponential backoff with jitter, before anything newer. So each sink gets
every record at least once, in the log's order; a record is sent twice only when a
batch was delivered but its acknowledgement (or the cursor write after it) was lost,
and it carries the same (instance, seq) both times.

The hot path never waits for a sink. It only asks `admit()` before each record, which
reads two numbers: the bytes not yet acknowledged by the slowest sink (refreshed by a
monitor task every `spool.poll_interval`, plus what was written since), and how long
each `required` sink has been failing. Over `spool.max_bytes`, or past a required
sink's `max_outage`, the record is refused: AuditLog raises AuditWriteError and the
call is denied, as with a full disk, until shipping catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from pathlib import Path

from ..telemetry import Metrics
from .shipping_settings import ShippingSettings, SinkSettings
from .sinks import Sink, SinkError, make_sink
from .spool import (
    Line,
    Position,
    SpoolReader,
    cursor_path,
    load_cursor,
    log_files,
    save_cursor,
    unshipped_bytes,
)

log = logging.getLogger("tether.audit.shipper")
SPOOL_FULL, SINK_DOWN = "spool_full", "sink_down"  # the causes a refusal is counted under


def backoff(attempt: int, low: float, high: float) -> float:
    """Exponential (low, 2 low, 4 low ... up to high), with jitter so replicas that lost
    the same receiver do not come back in step."""
    ceiling = min(high, low * 2 ** min(attempt - 1, 30))
    return random.uniform(ceiling / 2, ceiling)


class SinkWorker:
    def __init__(self, base: Path, settings: SinkSettings, sink: Sink, poll_s: float,
                 metrics: Metrics | None) -> None:
        self.base, self.settings, self.sink, self.poll_s = base, settings, sink, poll_s
        self.metrics = metrics
        self.cursor_file = cursor_path(base, settings.name)
        self.acked: Position = load_cursor(self.cursor_file)
        self.reader = SpoolReader(base, self.acked)
        self.down_since: float | None = None   # monotonic time of the first failure in a row
        self.last_error: str | None = None
        self.oldest: float | None = None       # epoch time of the oldest unacknowledged record
        self.unshipped = 0                     # bytes after the cursor (the monitor's last look)
        self.draining = False
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    async def run(self) -> None:
        """Ship until drained. Never ends on an error: one it does not expect (a bug, a file
        it cannot parse) is logged and shipping starts over from the cursor."""
        while True:
            try:
                await self._run()
                return
            except Exception:
                log.exception("audit sink %s: shipping failed unexpectedly; starting over from "
                              "its cursor", self.name)
                self.reader.close()
                self.reader = SpoolReader(self.base, self.acked)
                await asyncio.sleep(self.poll_s)

    async def _run(self) -> None:
        s = self.settings
        batch: list[Line] = []
        end = self.acked
        attempt = 0
        while True:
            if not batch:
                try:
                    batch = await asyncio.to_thread(self.reader.read_batch, s.batch_records,
                                                    s.batch_bytes)
                except OSError as e:  # a file moved under the reader: find it again
                    log.warning("audit sink %s: reading the spool: %s", self.name, e)
                    self.reader.close()
                    self.reader = SpoolReader(self.base, self.acked)
                    await asyncio.sleep(self.poll_s)
                    continue
                if not batch:
                    self.oldest = None
                    if self.draining:
                        return
                    with contextlib.suppress(TimeoutError):  # woken early by a drain
                        await asyncio.wait_for(self.wake.wait(), self.poll_s)
                    continue
                self.oldest = next((e for e in (ln.epoch() for ln in batch) if e is not None),
                                   time.time())
                end = self.reader.pos
            try:
                await self.sink.send(batch)
            except Exception as e:  # a sink's own bug must not end shipping: retried like an outage
                attempt += 1
                self._failed(e, len(batch))
                await asyncio.sleep(backoff(attempt, s.backoff_min_s, s.backoff_max_s))
                continue
            self.acked = end
            try:
                # Shielded: a stop that lands here still records what was delivered.
                await asyncio.shield(asyncio.to_thread(save_cursor, self.cursor_file, end))
            except OSError as e:  # delivered, but a restart would send it again: at least once
                log.warning("audit sink %s: cannot save its cursor: %s", self.name, e)
            if self.metrics is not None:
                self.metrics.audit_shipped.labels(self.name).inc(len(batch))
            if self.down_since is not None:
                log.warning("audit sink %s is delivering again (down %.1fs)", self.name,
                            time.monotonic() - self.down_since)
            self.down_since, self.last_error, attempt, batch = None, None, 0, []

    def _failed(self, error: Exception, records: int) -> None:
        if not isinstance(error, SinkError):
            log.exception("audit sink %s failed unexpectedly", self.name, exc_info=error)
        message = f"audit sink {self.name}: {error}"
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s; retrying with backoff (records wait in the spool)", message)
        self.last_error = message
        if self.metrics is not None:
            self.metrics.audit_failed.labels(self.name).inc(records)


class Shipper:
    """The sinks of one audit log. Implements spool.SpoolGate for AuditLog."""

    def __init__(self, base: str | Path, settings: ShippingSettings,
                 metrics: Metrics | None = None) -> None:
        self.base = Path(base)
        self.settings = settings
        self.metrics = metrics
        poll = settings.spool.poll_interval_s
        self.workers = [SinkWorker(self.base, s, make_sink(s), poll, metrics) for s in settings.sinks]
        self._written = 0        # bytes written since the monitor last looked
        self._count = threading.Lock()  # `written` runs on the writer's thread, `refresh` not
        self._lag = 0            # bytes the slowest sink has not acknowledged
        self._monitor: asyncio.Task[None] | None = None
        self.refresh()

    # -- the gate (called by AuditLog under its lock, any thread) --

    def refusal(self) -> tuple[str, str] | None:
        """(cause, message) when records must be refused now; /readyz shows the message."""
        limit = self.settings.spool.max_bytes
        lag = self._lag + self._written
        if lag > limit:
            slowest = max(self.workers, key=lambda w: w.unshipped)
            return SPOOL_FULL, (f"the audit spool is full: {lag} bytes not yet shipped (sink "
                                f"{slowest.name}: {slowest.last_error or 'behind'}; "
                                f"audit.spool.max_bytes {limit})")
        now = time.monotonic()
        for w in self.workers:
            if w.settings.required and w.down_since is not None \
                    and now - w.down_since > w.settings.max_outage_s:
                return SINK_DOWN, (f"required audit sink {w.name} has been down for "
                                   f"{now - w.down_since:.0f}s (max_outage "
                                   f"{w.settings.max_outage_s:g}s): {w.last_error}")
        return None

    def admit(self) -> str | None:
        refused = self.refusal()
        if refused is None:
            return None
        if self.metrics is not None:
            self.metrics.audit_refused.labels(refused[0]).inc()
        return refused[1]

    def written(self, size: int) -> None:
        with self._count:
            self._written += size
        if self.metrics is not None:
            self.metrics.audit_spooled.inc()

    def holds(self, path: Path) -> bool:
        suffix = path.name.rsplit(".", 1)[-1]
        if not suffix.isdigit():
            return True
        number = int(suffix)
        numbers: dict[int, int] = {}
        for p in log_files(self.base):
            tail = p.name.rsplit(".", 1)[-1]
            with contextlib.suppress(OSError):
                numbers[p.stat().st_ino] = int(tail) if p != self.base and tail.isdigit() else 0
        for w in self.workers:
            at = numbers.get(w.acked.ino)
            if at is None or at >= number:  # unknown: keep (evidence is not pruned on a guess)
                return True
        return False

    # -- the tasks --

    def refresh(self) -> None:
        """Recount the unshipped bytes per sink (a few stat calls) and the gauges."""
        written = self._written
        for w in self.workers:
            w.unshipped = unshipped_bytes(self.base, w.acked)
        self._lag = max((w.unshipped for w in self.workers), default=0)
        with self._count:
            self._written -= written
        if self.metrics is not None:
            now = time.time()
            for w in self.workers:
                self.metrics.audit_spool_bytes.labels(w.name).set(w.unshipped)
                self.metrics.audit_oldest_unshipped.labels(w.name).set(
                    max(0.0, now - w.oldest) if w.oldest is not None else 0.0)
                self.metrics.audit_sink_up.labels(w.name).set(0 if w.down_since else 1)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.spool.poll_interval_s)
            try:  # on the loop: a few stat calls, cheaper than a hop to a thread and back
                self.refresh()
            except Exception:  # a file vanishing mid-count: next round
                log.exception("audit spool: counting unshipped bytes failed")

    def start(self) -> None:
        """On the running loop (the admin app's startup, or a test's)."""
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w.task is None:
                w.task = loop.create_task(w.run(), name=f"audit-sink-{w.name}")
        if self._monitor is None:
            self._monitor = loop.create_task(self._watch(), name="audit-spool-monitor")

    async def drain(self, timeout: float | None = None) -> bool:
        """Ship what is in the spool, for at most `timeout` seconds (default
        `spool.drain_timeout`), then stop. True when every sink caught up; what is left
        stays in the spool for the next start."""
        timeout = self.settings.spool.drain_timeout_s if timeout is None else timeout
        tasks = [w.task for w in self.workers if w.task is not None]
        for w in self.workers:
            w.draining = True
            w.wake.set()
        done = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            done = not pending
        await self.close()
        for w in self.workers:
            left = unshipped_bytes(self.base, w.acked)
            if left:
                done = False
                log.warning("audit sink %s: %d bytes not shipped at shutdown (%s); they stay in "
                            "the spool and are shipped at the next start", w.name, left,
                            w.last_error or "the drain timed out")
        return done

    async def close(self) -> None:
        tasks = [w.task for w in self.workers if w.task is not None]
        if self._monitor is not None:
            tasks.append(self._monitor)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._monitor = None
        for w in self.workers:
            w.task = None
            w.reader.close()
            with contextlib.suppress(Exception):
                await w.sink.close()
