"""Which loop `tether serve` runs on (proxy/event_loop.py): the config's choice, the
environment's override, and asyncio's loop when uvloop is not installed."""

from __future__ import annotations

import asyncio
import sys

import pytest

from proxy.errors import ConfigError
from proxy.event_loop import ENV, loop_factory, run


def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop: ImportError


@pytest.mark.parametrize(("choice", "env", "name"), [
    ("asyncio", None, "asyncio"),
    ("uvloop", "asyncio", "asyncio"),   # the environment wins
])
def test_the_choice_and_its_override(monkeypatch: pytest.MonkeyPatch, choice: str,
                                     env: str | None, name: str) -> None:
    monkeypatch.delenv(ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(ENV, env)
    assert loop_factory(choice)[0] == name


def test_auto_without_uvloop_is_asyncio_and_uvloop_without_it_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    without_uvloop(monkeypatch)
    assert loop_factory("auto") == ("asyncio", None)
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_an_unknown_loop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "trio")
    with pytest.raises(ConfigError, match="trio"):
        loop_factory("auto")


def test_uvloop_runs_what_asyncio_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(ENV, raising=False)

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(which(), "uvloop").startswith("uvloop")
    assert run(which(), "asyncio").startswith("asyncio")


def test_the_default_is_asyncio_even_with_uvloop_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the tests run is what the image ships: uvloop only when asked for."""
    from proxy.server_settings import ServerLimits
    monkeypatch.delenv(ENV, raising=False)
    assert ServerLimits().event_loop == "asyncio"
    assert loop_factory(ServerLimits().event_loop) == ("asyncio", None)


def test_the_heap_is_settled_once_the_server_is_built() -> None:
    """`tether serve` (cli._serve) freezes start-up's objects and collects less often;
    the test puts the process back as it was."""
    import gc

    from proxy.event_loop import GC_THRESHOLDS, settle_heap

    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
