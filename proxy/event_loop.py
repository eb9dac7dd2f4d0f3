"""Which event loop `tether serve` runs on.

    server:
      event_loop: asyncio     # the default: asyncio's own loop; uvloop: uvloop or a
                              # config error; auto: uvloop when it is installed

The environment variable TETHER_EVENT_LOOP (same values) wins over the config, so a
benchmark or an operator can compare the two without editing it. uvloop is optional
(`pip install uvloop==0.23.0`; not a dependency: on this project's 2-core benchmark it
did not clearly pay, bench/README.md, so the default stays the loop the image ships);
without it `auto` is asyncio's loop and nothing else changes: both loops run the same code.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import ConfigError

CHOICES = ("auto", "asyncio", "uvloop")
# The cyclic collector's first threshold and the two after it (Python's: 700, 10, 10).
GC_THRESHOLDS = (7000, 20, 20)
ENV = "TETHER_EVENT_LOOP"


def loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The loop's name and its factory (None: asyncio's default) for `choice`, after the
    environment's override. Raises ConfigError for an unknown value or a missing uvloop."""
    choice = os.environ.get(ENV, choice) or "asyncio"
    if choice not in CHOICES:
        raise ConfigError(f"{ENV}/server.event_loop: {choice!r} is not one of "
                          + ", ".join(CHOICES))
    if choice == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as e:
        if choice == "uvloop":
            raise ConfigError("server.event_loop is uvloop but uvloop is not installed "
                              "(pip install uvloop, or event_loop: auto)") from e
        return "asyncio", None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return "uvloop", factory


def run[T](main: Coroutine[Any, Any, T], choice: str = "asyncio") -> T:
    """asyncio.run on the chosen loop."""
    _, factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def settle_heap() -> None:
    """Once the server is built: what start-up made (config, catalogs, compiled rules)
    moves out of the collector's sight (gc.freeze), and collections come ten times less
    often. Each request leaves cycles (futures, tracebacks) that only the collector
    frees, so it ran ~85 times a second under load and walked the whole start-up heap
    in its older generations: 6 % of the CPU, 2 % after this (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
