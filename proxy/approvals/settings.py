"""The `approvals:` and `slack:` sections of the config.

    approvals:
      timeout: 10m                 # a hold rule without its own timeout waits this long
      ticket_validity: 1h          # an approved ticket may be redeemed this long
      max_pending: 100             # past these, new holds are denied at once
      max_pending_per_session: 5
      keepalive: 15s               # SSE comment interval while a stream waits
      keep_decided: 500            # ended approvals listed by GET /v1/approvals (recent)
      keep_decided_for: 24h        # and how long they stay readable (store: redis)
      lease: 15s                   # store: redis: a replica that has not renewed its lease
                                   # this long is dead; what it waited on ends abandoned
    slack:
      channel: C0123456789
      approvers: [U0123ABCD]       # Slack user ids whose clicks count
      bot_token_env: SLACK_BOT_TOKEN
      signing_secret_env: SLACK_SIGNING_SECRET
      api_url: https://slack.com/api   # TETHER_UPSTREAM_SLACK overrides it
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config_tables_run import APPROVALS, SLACK
from ..errors import ConfigError
from ..policy.rules import parse_duration
from ..policy.source import YMap


@dataclass(frozen=True, slots=True)
class ApprovalSettings:
    timeout_s: float = 600.0
    ticket_validity_s: float = 3600.0
    max_pending: int = 100
    max_pending_per_session: int = 5
    keepalive_s: float = 15.0
    keep_decided: int = 500
    keep_decided_for_s: float = 86400.0
    lease_s: float = 15.0


@dataclass(frozen=True, slots=True)
class SlackSettings:
    channel: str
    approvers: tuple[str, ...]
    bot_token_env: str = "SLACK_BOT_TOKEN"
    signing_secret_env: str = "SLACK_SIGNING_SECRET"
    api_url: str = "https://slack.com/api"


def _err(message: str, node: YMap, key: str, where: str) -> ConfigError:
    return ConfigError(message, file=node.file, line=node.line_of(key), key=f"{where}.{key}")


def _keys(node: YMap, allowed: frozenset[str], where: str) -> None:
    for key in node:
        if key not in allowed:
            raise _err(f"unknown key (expected one of {', '.join(sorted(allowed))})", node, key,
                       where)


def parse_approvals(node: object, parent: YMap) -> ApprovalSettings:
    if node is None:
        return ApprovalSettings()
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of("approvals"),
                          key="approvals")
    where = "approvals"
    _keys(node, APPROVALS.names, where)

    def duration(key: str, default: float) -> float:
        if key not in node:
            return default
        return parse_duration(node[key], lambda m: _err(m, node, key, where))

    def lease() -> float:
        value = duration("lease", 15)
        if value < 1:
            raise _err("must be at least 1s (the lease is renewed every third of it)", node,
                       "lease", where)
        return value

    def count(key: str, default: int) -> int:
        value = node.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _err("must be a positive whole number", node, key, where)
        return value

    return ApprovalSettings(duration("timeout", 600), duration("ticket_validity", 3600),
                            count("max_pending", 100), count("max_pending_per_session", 5),
                            duration("keepalive", 15), count("keep_decided", 500),
                            duration("keep_decided_for", 86400), lease())


def parse_slack(node: object, parent: YMap, env: Mapping[str, str]) -> SlackSettings | None:
    if node is None:
        return None
    if not isinstance(node, YMap):
        raise ConfigError("must be a mapping", file=parent.file, line=parent.line_of("slack"),
                          key="slack")
    where = "slack"
    _keys(node, SLACK.names, where)
    channel = node.get("channel")
    if not isinstance(channel, str) or not channel:
        raise _err("the channel id to post approvals in is required", node, "channel", where)
    approvers = node.get("approvers")
    if not isinstance(approvers, list) or not approvers or not all(
            isinstance(a, str) and a for a in approvers):
        raise _err("list the Slack user ids allowed to approve (an empty list would let "
                   "anyone in the channel approve)", node, "approvers", where)
    strings = {}
    for key, default in (("bot_token_env", "SLACK_BOT_TOKEN"),
                         ("signing_secret_env", "SLACK_SIGNING_SECRET"),
                         ("api_url", "https://slack.com/api")):
        value = node.get(key, default)
        if not isinstance(value, str) or not value:
            raise _err("must be a non-empty string", node, key, where)
        strings[key] = value
    api_url = env.get("TETHER_UPSTREAM_SLACK", strings["api_url"]).rstrip("/")
    return SlackSettings(channel, tuple(approvers), strings["bot_token_env"],
                         strings["signing_secret_env"], api_url)
