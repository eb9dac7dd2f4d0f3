"""Each held call is posted to Slack when it opens and edited when it ends, from any replica.

The queue's listeners run synchronously inside `create`/`decide`, so they only
start background tasks; every task is owned here until done, and `close`
drains them. The message's channel and ts are kept with the approval (in
Redis, with `store: redis`), so the replica that ends an approval edits the
message another replica posted; the edit is claimed once, by whichever of
"posted" and "ended" comes second. Slack being down never decides anything:
a hold whose message could not be posted times out unless someone approves
it elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from ...audit import AuditLog, AuditWriteError
from ...errors import StoreUnavailable
from ...telemetry import Metrics
from ..queue import Approval, Approvals
from ..settings import SlackSettings
from .interactions import Click, Interactions
from .messages import decided_message, pending_message
from .web_api import HttpSource, SlackError, WebApi

log = logging.getLogger("tether.approvals.slack")

CLOSE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Posted:
    channel: str
    ts: str


class SlackNotifier:
    """Posts holds to Slack; `interactions.handle` applies the clicks that come back."""

    def __init__(self, settings: SlackSettings, queue: Approvals, http: HttpSource = None,
                 audit: AuditLog | None = None, metrics: Metrics | None = None, *,
                 ticket_validity_s: float = 3600.0, env: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.queue = queue
        self.audit = audit
        registry = metrics.registry if metrics is not None else None
        self.api = WebApi(settings, http, env, registry)  # env read at use: rotation applies
        self.interactions = Interactions(settings, queue, env=env, clock=clock,
                                         ticket_validity_s=ticket_validity_s, audit=self._audit,
                                         tell=self._tell_clicker, registry=registry)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        queue.on_created(self._created)
        queue.on_decided(self._decided)

    # -- the queue's listeners ------------------------------------------------------------

    def _created(self, approval: Approval) -> None:
        self._spawn(self._post_and_share(approval), f"slack-post-{approval.id}")

    def _decided(self, approval: Approval) -> None:
        self._spawn(self._update(approval.id), f"slack-update-{approval.id}")

    def _tell_clicker(self, click: Click, text: str) -> None:
        self._spawn(self._tell(click.channel or self.settings.channel, click.user_id, text),
                    f"slack-tell-{click.approval_id}")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        if self._closed:
            coro.close()
            log.warning("slack: %s skipped, tether is shutting down", name)
            return None
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:
            coro.close()
            log.error("slack: %s skipped, no event loop is running", name)
            return None
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("slack: %s failed", task.get_name(), exc_info=task.exception())

    # -- the messages ---------------------------------------------------------------------

    async def _post(self, approval: Approval) -> Posted | None:
        body = {"channel": self.settings.channel, **pending_message(approval)}
        try:
            reply = await self.api.call("chat.postMessage", body)
        except SlackError as e:
            # Nothing is approved by a failure: the hold waits, then times out (a deny).
            log.error("slack: approval %s was not posted: %s", approval.id, e)
            self._audit({"kind": "approval", "event": "slack_post_failed", "id": approval.id,
                         "tool": approval.tool, "error": str(e)})
            return None
        channel, ts = reply.get("channel") or self.settings.channel, reply.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            log.error("slack: chat.postMessage for %s answered without channel and ts", approval.id)
            return None
        return Posted(channel, ts)

    async def _post_and_share(self, approval: Approval) -> None:
        posted = await self._post(approval)
        if posted is None:
            return
        try:
            await self.queue.set_message(approval.id, posted.channel, posted.ts)
        except StoreUnavailable as e:
            log.error("slack: the message of approval %s was not recorded: %s", approval.id,
                      e.message)
            return
        await self._update(approval.id)  # it may have ended while we posted

    async def _update(self, approval_id: str) -> None:
        """Edits the message if the approval has ended and the message exists, unless
        someone (on any replica) already claimed that edit."""
        try:
            claimed = await self.queue.claim_message(approval_id)
        except StoreUnavailable as e:
            log.error("slack: the message of approval %s was not updated: %s", approval_id,
                      e.message)
            return
        if claimed is None:
            return
        try:
            await self.api.call("chat.update", {"channel": claimed.channel, "ts": claimed.ts,
                                                **decided_message(claimed.approval,
                                                                  claimed.slack_user)})
        except SlackError as e:
            log.error("slack: the message of approval %s was not updated: %s", approval_id, e)

    async def _tell(self, channel: str, user: str, text: str) -> None:
        try:
            await self.api.call("chat.postEphemeral", {"channel": channel, "user": user,
                                                       "text": text})
        except SlackError as e:
            log.warning("slack: could not tell %s: %s", user, e)

    async def close(self) -> None:
        """Let in-flight posts and updates finish (briefly), then stop."""
        self._closed = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.api.close()

    def _audit(self, record: dict[str, object]) -> None:
        if self.audit is None:
            return
        try:
            self.audit.write(record)
        except AuditWriteError:
            log.exception("audit write failed for a Slack approval event")
