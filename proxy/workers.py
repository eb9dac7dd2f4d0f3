"""`tether serve --workers N`: N processes share every port, one parent supervises them.

One event loop uses one core; a worker is one whole tether (`tether serve` again, with
TETHER_WORKER=i/N in its environment) listening with SO_REUSEPORT, so the kernel spreads
new connections over the workers of each port (proxy, admin, forward, transparent).

What stays exact across workers is what already stays exact across replicas: budgets,
holds, loop breakers, linked calls and the decided-call ledger live in the Redis store,
so the parent refuses `store: memory` with N > 1 (each process would keep its own: N
times every budget). An approval reaches the worker whose request waits on it through
the same store, whichever worker's admin port took it.

The parent:
  - reserves each port by binding it (not listening) with SO_REUSEPORT: a port 0 becomes
    one concrete port every worker then listens on, and the port stays tether's while a
    worker restarts (a bound socket that does not listen gets no connections);
  - prints the usual start line once every worker listens (each says so on a pipe);
  - forwards SIGHUP (reload: each worker reloads its own policy) and SIGTERM or SIGINT
    (each worker stops as one tether does, server/lifecycle.py), waits for them, and
    exits 0, or 1 if one did not stop cleanly;
  - restarts a worker that dies on its own (crash, OOM kill) under the same index, so
    its audit chain continues; one that dies within CRASH_LOOP_S of starting stops the
    rest and the parent exits 1, as a crash at start would only repeat.

Each worker writes its own hash chain (a chain has one writer): `audit.jsonl` becomes
`audit.w0.jsonl`, `audit.w1.jsonl` ..., each with instance `<name>-w<i>` and its own
`seq`; each record is durable in its worker's file before the decision is acknowledged,
as with one process. `tether audit verify --merged` checks them together. Audit sinks
that every worker would write into at once (stdout, file) are refused with N > 1.

Metrics: the parent gives the workers one PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode), so `/metrics`, whichever worker answers, sums counters and
histograms over all of them; gauges carry a `pid` label per worker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from .audit.instance import default_name
from .audit.settings import AuditSettings
from .config import Config
from .errors import ConfigError
from .server_settings import MAX_WORKERS

ENV = "TETHER_WORKER"              # "i/N" in a worker's environment
READY_FD_ENV = "TETHER_WORKER_READY_FD"
CRASH_LOOP_S = 10.0                # a worker that dies sooner after its start is not restarted
START_TIMEOUT_S = 120.0
SHARED_SINKS = ("stdout", "file")


@dataclass(frozen=True, slots=True)
class Worker:
    index: int
    count: int

    def audit_path(self, path: str | None) -> str | None:
        """`audit.jsonl` -> `audit.w0.jsonl`: one chain per worker."""
        if path is None:
            return None
        p = Path(path)
        return str(p.with_name(f"{p.stem}.w{self.index}{p.suffix}"))

    def audit_settings(self, settings: AuditSettings) -> AuditSettings:
        return replace(settings, instance=f"{settings.instance or default_name()}-w{self.index}")


def this_worker() -> Worker | None:
    """Which worker this process is (None: not started by a parent)."""
    value = os.environ.get(ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    try:
        worker = Worker(int(index), int(count))
    except ValueError:
        raise ConfigError(f"{ENV}={value!r}: expected INDEX/COUNT") from None
    if not 0 <= worker.index < worker.count:
        raise ConfigError(f"{ENV}={value!r}: expected INDEX/COUNT")
    return worker


def refusal(cfg: Config, workers: int) -> str | None:
    """Why `cfg` cannot run with `workers` processes, or None."""
    if not 1 <= workers <= MAX_WORKERS:
        return f"--workers must be a whole number from 1 to {MAX_WORKERS}"
    if workers == 1:
        return None
    if cfg.store_url == "memory":
        return (f"--workers {workers} needs a shared session store: budgets, holds and loop "
                "breakers live in the store, and a memory store is one per process (each "
                "worker would allow the whole budget). Set `store: redis://HOST:6379/0` "
                "(or TETHER_STORE), or run one worker")
    shared = sorted({s.type for s in cfg.audit_shipping.sinks if s.type in SHARED_SINKS})
    if shared:
        return (f"--workers {workers}: audit sink(s) of type {', '.join(shared)} would be "
                "written by every worker at once; ship with an http, syslog or otlp sink, "
                "or run one worker per container")
    return None


def ready() -> None:
    """Tells the parent this worker listens (no-op without one)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except (OSError, ValueError):
        pass


async def watch_parent(stop: asyncio.Event) -> None:
    """Sets `stop` once the parent that started this worker has died (it was killed
    without a chance to stop its workers): an orphan would hold the ports."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop.set()


def reserve(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket holding `port` (0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or "0.0.0.0", port))
    return sock


@dataclass(frozen=True, slots=True)
class Ports:
    proxy: int
    admin: int
    forward: int | None
    transparent: int | None

    def flags(self) -> list[str]:
        out = ["--port", str(self.proxy), "--admin-port", str(self.admin)]
        if self.forward is not None:
            out += ["--forward-port", str(self.forward)]
        if self.transparent is not None:
            out += ["--transparent-port", str(self.transparent)]
        return out


class Supervisor:
    """The parent of `count` workers."""

    def __init__(self, config_file: str, host: str, ports: Ports, count: int,
                 verbose: bool = False) -> None:
        self.config_file, self.host, self.ports, self.count = config_file, host, ports, count
        self.verbose = verbose
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.stopping = False
        self.hangups = 0
        self.metrics_dir = ""

    def _spawn(self, index: int) -> tuple[subprocess.Popen[bytes], int]:
        read, write = os.pipe()
        env = {**os.environ, ENV: f"{index}/{self.count}", READY_FD_ENV: str(write),
               "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        cmd = [sys.executable, "-m", "proxy", *(["-v"] if self.verbose else []), "serve",
               "--config", self.config_file, "--host", self.host, *self.ports.flags()]
        try:
            proc = subprocess.Popen(cmd, env=env, pass_fds=(write,))
        finally:
            os.close(write)
        self.procs[index] = proc
        self.started[index] = time.monotonic()
        return proc, read

    def _await_ready(self, pending: dict[int, int]) -> bool:
        """True once every worker in `pending` (index -> its pipe) said it listens."""
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while pending and not self.stopping and time.monotonic() < deadline:
                for index, fd in list(pending.items()):
                    if self.procs[index].poll() is not None:
                        return False
                    os.set_blocking(fd, False)
                    try:
                        said = os.read(fd, 16)
                    except BlockingIOError:
                        continue
                    if said.startswith(b"ready"):
                        os.close(pending.pop(index))
                    elif not said:   # closed without a word: it died starting
                        return False
                time.sleep(0.02)
            return not pending
        finally:
            for fd in pending.values():
                os.close(fd)

    def run(self, announce: Callable[[], None]) -> int:
        own = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="tether-metrics-")
        handlers = {sig: signal.signal(sig, self._signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            pending = {i: self._spawn(i)[1] for i in range(self.count)}
            if not self._await_ready(pending):
                if self.stopping:   # SIGTERM while they started
                    return self._stop_all()
                print("tether: a worker did not start (see its log above); stopping",
                      file=sys.stderr, flush=True)
                self._stop_all()
                return 1
            announce()
            return self._supervise()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            if own:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.hangups += 1
        else:
            self.stopping = True

    def _supervise(self) -> int:
        hangups = 0
        while not self.stopping:
            if self.hangups != hangups:
                hangups = self.hangups
                for proc in self.procs.values():
                    proc.send_signal(signal.SIGHUP)
            for index, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                self._dead(proc.pid)
                lived = time.monotonic() - self.started[index]
                if lived < CRASH_LOOP_S:
                    print(f"tether: worker {index} exited ({code}) {lived:.1f} s after it "
                          "started; stopping the others", file=sys.stderr, flush=True)
                    self._stop_all()
                    return 1
                print(f"tether: worker {index} exited ({code}); restarting it",
                      file=sys.stderr, flush=True)
                _, fd = self._spawn(index)
                if not self._await_ready({index: fd}):
                    self._stop_all()
                    return 1
            time.sleep(0.1)
        return self._stop_all()

    def _stop_all(self) -> int:
        """SIGTERM to every worker, then wait: each drains (server.drain_timeout, the
        audit spool's drain) on its own. 0 when every one stopped cleanly."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        failed = 0
        for proc in self.procs.values():
            code = proc.wait()
            self._dead(proc.pid)
            failed += code not in (0, -signal.SIGTERM)
        return 1 if failed else 0

    def _dead(self, pid: int) -> None:
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        except (ImportError, OSError):
            pass


def serve(cfg: Config, config_file: str, host: str, ports: Ports, count: int, verbose: bool,
          announce: Callable[[Ports], None]) -> int:
    """The parent's whole life: check, reserve the ports, run the workers, stop them."""
    why = refusal(cfg, count)
    if why is not None:
        raise ConfigError(why)
    held: list[socket.socket] = []
    try:
        concrete: dict[str, int | None] = {}
        for name in ("proxy", "admin", "forward", "transparent"):
            port = getattr(ports, name)
            if port is None:
                concrete[name] = None
                continue
            try:
                sock = reserve(host, port)
            except OSError as e:
                raise ConfigError(f"cannot listen on {host}:{port} ({name} port): {e}") from e
            held.append(sock)
            concrete[name] = int(sock.getsockname()[1])
        bound = Ports(concrete["proxy"] or 0, concrete["admin"] or 0, concrete["forward"],
                      concrete["transparent"])
        supervisor = Supervisor(config_file, host, bound, count, verbose)
        return supervisor.run(lambda: announce(bound))
    finally:
        for sock in held:
            sock.close()
