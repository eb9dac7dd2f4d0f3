"""What a config reload is, without the server: which files to watch, whether they
changed, whether a new config may replace the running one, and what changed.

The running policy is one value, the `Config` (frozen, with its compiled `Policy`).
A reload builds the next one completely (`config.load`, the checks `tether check`
runs) off the event loop, refuses it when it is broken or would open the gate, keeps
the running value of every setting that cannot change while the process runs
(`RESTART_ONLY`), and hands the result to the server (server/reload.py), which swaps
it in with plain assignments and no await between them.

Watching is a poll, not inotify: the kubelet updates a ConfigMap volume by renaming a
`..data` symlink over the old one, editors rename a new file over the old, and some
tools overwrite in place; `os.stat` through the path as the config names it (symlinks
followed) sees a new inode, mtime or size in each case. A change is loaded only once
the files have held still for one poll, and the set is read again after the load to
make sure it did not move under the loader: a half-written file is never the policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .config import Config
from .policy.rules import Rule

# What a reload puts in force (server/reload.py hands each to the component that reads
# it). Every other setting was read once at start (listening sockets, the store, the
# audit log, the telemetry and upstream clients, the forward proxy's listeners and CA,
# credentials, settings added later and not yet listed here): a reload that changes one
# keeps the running value and reports it as needing a restart.
RELOADABLE = frozenset({"policy", "budgets", "on_store_error", "approvals", "apis", "mcp",
                        "provider_tools", "tool_apis", "cloud", "opa"})
# How the config spells the restart-only settings (else the field's own name).
RESTART_ONLY: Mapping[str, str] = {
    "host": "server.host",
    "port": "server.port",
    "admin_port": "server.admin_port",
    "max_body_bytes": "limits.max_body_bytes",
    "max_response_bytes": "limits.max_response_bytes",
    "max_arguments_bytes": "limits.max_arguments_bytes",
    "upstream_timeout_s": "limits.upstream_timeout",
    "audit_path": "audit.path",
    "audit": "audit",
    "audit_shipping": "audit.sinks / audit.spool",
    "admin_token_env": "admin.token_env",
    "trust_identity_headers": "identity.trust_headers",
    "store_url": "store",
    "agent_keys": "agents.*.key_sha256",
    "upstreams": "upstreams",
    "forward": "forward",
    "auth": "auth",
    "telemetry": "telemetry",
    "slack": "slack",
    "lookups": "cloud.lookups",
}
# Parts of `approvals:` the approval queue was built with (its limits); the rest
# (timeouts, keep-alives, ticket validity) applies to holds opened after the reload.
APPROVAL_QUEUE_KEYS = ("max_pending", "max_pending_per_session", "keep_decided",
                       "keep_decided_for_s")
# Not compared: where the config came from and what loading it said.
BOOKKEEPING = frozenset({"source", "warnings", "files", "open_gate"})


@dataclass(frozen=True, slots=True)
class RulesDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def as_json(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "removed": list(self.removed),
                "changed": list(self.changed)}

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated new config and how it differs from the running one.

    `config`: what will run (the new config with every restart-only setting kept as it
    runs); `changed`: the config fields that take effect; `needs_restart`: the settings
    that changed but wait for a restart, as the config spells them."""

    config: Config
    rules: RulesDiff
    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.changed and not self.needs_restart


class Refused(Exception):
    """A config that loads but must not replace the running one (it opens the gate)."""


def _rule_key(rule: Rule) -> Rule:
    return replace(rule, file=None, line=0)  # moving a rule within its file changes nothing


def diff_rules(old: Sequence[Rule], new: Sequence[Rule]) -> RulesDiff:
    before = {r.id: _rule_key(r) for r in old}
    after = {r.id: _rule_key(r) for r in new}
    return RulesDiff(
        added=tuple(i for i in after if i not in before),
        removed=tuple(i for i in before if i not in after),
        changed=tuple(i for i in after if i in before and before[i] != after[i]),
    )


def plan(running: Config, new: Config) -> Plan:
    """Raises `Refused` when `new` would allow every call (no rule, no written
    `defaults.action`): fail closed, the running policy stays."""
    if new.open_gate:
        raise Refused(f"{new.source}: the new config has no rules and no defaults.action, "
                      "which allows every call; refused (write defaults.action to mean it)")
    keep: dict[str, object] = {}
    needs_restart: list[str] = []
    for f in fields(Config):
        name = f.name
        if name in RELOADABLE or name in BOOKKEEPING:
            continue
        if getattr(running, name) != getattr(new, name):
            keep[name] = getattr(running, name)
            needs_restart.append(RESTART_ONLY.get(name, name))
    queue_kept = {k: getattr(running.approvals, k) for k in APPROVAL_QUEUE_KEYS
                  if getattr(running.approvals, k) != getattr(new.approvals, k)}
    if queue_kept:
        keep["approvals"] = replace(new.approvals, **queue_kept)
        needs_restart += [f"approvals.{k}" for k in queue_kept]
    effective = replace(new, **keep)  # type: ignore[arg-type]
    # The revision hashes every policy text (canonical for the main file): the same
    # revision is the same policy, whatever moved within the files.
    changed = tuple(f.name for f in fields(Config) if f.name not in BOOKKEEPING and (
        running.policy.revision != effective.policy.revision if f.name == "policy"
        else getattr(running, f.name) != getattr(effective, f.name)))
    return Plan(effective, diff_rules(running.policy.rules, new.policy.rules), changed,
                tuple(needs_restart))


def watched(config: Config) -> tuple[str, ...]:
    """The config file, every file it includes, its OpenAPI specs, and the embedded
    OPA directory's policy files (listed again at every poll: a new .rego counts)."""
    paths = list(config.files or ((config.source,) if config.source else ()))
    if config.opa is not None and config.opa.source:
        directory = Path(config.opa.source)
        try:
            names = sorted(p.name for p in directory.iterdir()
                           if p.suffix == ".rego" or p.name == "data.json")
        except OSError:
            names = []
        paths += [str(directory)] + [str(directory / n) for n in names]
    return tuple(paths)


Stamp = tuple[int, int, int, int] | None


def fingerprint(paths: Iterable[str]) -> tuple[tuple[str, Stamp], ...]:
    """(device, inode, mtime in ns, size) of each path, symlinks followed; None for a
    path that cannot be read (a vanished file is a change too)."""
    out: list[tuple[str, Stamp]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, None))
            continue
        out.append((path, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)))
    return tuple(out)
