"""tether's command line: serve | demo | check | test | explain | replay | audit verify|calls."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import config as config_mod
from . import demo
from .cli_offline import (
    cmd_check,
    cmd_explain,
    cmd_opa_test,
    cmd_replay,
    cmd_test,
    load_config,
)
from .cli_setup import add_commands as add_setup_commands
from .cli_setup import version
from .errors import ConfigError
from .surrogates import scrub
from .workers import Worker

log = logging.getLogger("tether")


async def _serve(cfg: config_mod.Config, host: str, port: int, admin_port: int,
                 forward_port: int | None = None, transparent_port: int | None = None,
                 worker: Worker | None = None) -> None:
    from . import tracing
    from .event_loop import settle_heap
    from .server.app import CONTEXT, bound_port, build, start

    # OTLP/HTTP export only when an OTEL_EXPORTER_OTLP_*ENDPOINT is set; else no tracing.
    spans = tracing.from_env()
    tracing.install(spans)
    tether = build(cfg, worker=worker)
    _open_files(cfg.connections.max_connections)
    runners = await start(tether, host=host, port=port, admin_port=admin_port,
                          reuse_port=worker is not None)
    proxy_port, admin_bound = bound_port(runners[0]), bound_port(runners[1])
    forward = None
    if forward_port is not None or transparent_port is not None:
        from .egress import Egress
        from .forward.master import start_forward

        loopback = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        forward = await start_forward(tether.governor, tether.governor.metrics, cfg.forward,
                                      host=host, port=forward_port,
                                      reverse=(loopback, proxy_port), own_ports=(admin_bound,),
                                      egress=Egress(cfg.apis, cfg.cloud, tether.holds,
                                                    cfg.agent_keys, cfg.trust_identity_headers,
                                                    cfg.lookups, opa=tether.opa,
                                                    linked=tether.linked),
                                      transparent_port=transparent_port,
                                      auth=tether.proxy[CONTEXT].auth,
                                      limits=cfg.connections,
                                      reuse_port=worker is not None)
    settle_heap()
    if worker is None:
        _announce(cfg, host, proxy_port, admin_bound,
                  forward.port if forward and forward_port is not None else None,
                  forward.transparent_port if forward else None)
    else:   # its parent speaks for all of them (workers.py)
        print(f"tether: worker {worker.index} of {worker.count} (pid {os.getpid()}) listens",
              file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher = None
    if worker is not None:
        from .workers import ready, watch_parent

        ready()
        watcher = asyncio.create_task(watch_parent(stop), name="tether.worker.parent")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if tether.reloader is not None:  # policy changes without a restart (docs/reload.md)
        tether.reloader.forward = forward
        tether.reloader.start_watching()
        loop.add_signal_handler(signal.SIGHUP, tether.reloader.request, "SIGHUP")
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    # Stop accepting, answer held calls, drain, then close the audit log and ship it.
    from .server.lifecycle import shutdown

    await shutdown(tether, runners, forward)
    if spans is not None:
        spans.shutdown()  # flushes the last batch


def _announce(cfg: config_mod.Config, host: str, proxy_port: int, admin_port: int,
              forward_port: int | None, transparent_port: int | None, *,
              workers: int = 1) -> None:
    from .providers import PROVIDERS

    prefixes = " ".join(f"/{p.name}/" for p in PROVIDERS)
    print(
        f"tether: proxy on http://{host}:{proxy_port} "
        f"({prefixes}), admin on http://{host}:{admin_port}, "
        + (f"HTTP_PROXY on http://{host}:{forward_port} (CA {cfg.forward.ca_dir}), "
           if forward_port is not None else "")
        + (f"transparent on {host}:{transparent_port}, " if transparent_port is not None else "")
        + (f"{workers} workers, " if workers > 1 else "")
        + f"policy revision {cfg.policy.revision}, audit {cfg.audit_path or 'off'}",
        # With a stdout sink, stdout is the audit stream and nothing else.
        file=sys.stderr if any(s.type == "stdout" for s in cfg.audit_shipping.sinks)
        else sys.stdout,
        flush=True,
    )


def _open_files(max_connections: int) -> None:
    """Raise the soft open-files limit toward the hard one: each port may hold
    `server.max_connections` clients, each proxied one an upstream socket as well."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 6 * max_connections + 256
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (
                want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    except (ImportError, ValueError, OSError) as e:
        log.warning("could not raise the open-files limit: %s", e)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    for up in cfg.upstreams.values():
        if up.api_key_env and not os.environ.get(up.api_key_env):
            print(f"warning: upstream {up.name}: {up.api_key_env} is not set; "
                  + ("the agent's own key is passed through" if up.pass_agent_credentials
                     else "its requests are refused (503) until it is"), file=sys.stderr)
    from . import workers
    from .event_loop import run

    host = args.host or cfg.host
    ports = workers.Ports(cfg.port if args.port is None else args.port,
                          cfg.admin_port if args.admin_port is None else args.admin_port,
                          args.forward_port,
                          cfg.forward.transparent_port if args.transparent_port is None
                          else args.transparent_port)
    worker = workers.this_worker()
    count = cfg.connections.workers if args.workers is None else args.workers
    if worker is None and count != 1:   # this process supervises; the workers serve
        return workers.serve(cfg, args.config, host, ports, count, args.verbose,
                             lambda bound: _announce(cfg, host, bound.proxy, bound.admin,
                                                     bound.forward, bound.transparent,
                                                     workers=count))
    run(_serve(cfg, host, ports.proxy, ports.admin, ports.forward, ports.transparent, worker),
        cfg.connections.event_loop)
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    """Print the forward proxy's CA certificate (creating the CA if needed); never the key."""
    from .forward.ca import export_pem

    cfg = load_config(args.config)
    sys.stdout.write(export_pem(cfg.forward.ca_dir))
    return 0


def _admin(args: argparse.Namespace, method: str, path: str,
           body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    token = os.environ.get(args.token_env, "")
    if not token:
        raise SystemExit(f"error: set {args.token_env} to the admin token")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(args.admin_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except urllib.error.URLError as e:
        raise SystemExit(f"error: cannot reach the admin port at {args.admin_url}: {e.reason}"
                         ) from e


def _show(a: dict[str, object]) -> str:
    args = str(a.get("arguments", ""))
    args = args if len(args) <= 80 else args[:77] + "..."
    rules = ", ".join(str(r) for r in a.get("rules", []) or [])  # type: ignore[attr-defined]
    who = f" by {a['decided_by']}" if a.get("decided_by") else ""
    # Agent text read back from JSON may hold lone surrogates; print() could not write them,
    # and terminal escapes or bidi overrides: shown as \u escapes (approvals/shown.py).
    from .approvals.shown import visible_text

    return scrub(visible_text(f"{a['id']}  {a['state']}{who}  {a['tool']}({args})  "
                              f"agent={a.get('agent')} session={a.get('session')} rules={rules}"))


def cmd_approvals(args: argparse.Namespace) -> int:
    if args.action == "list":
        status, body = _admin(args, "GET", "/v1/approvals")
        if status != 200:
            print(f"error: HTTP {status}: {body}", file=sys.stderr)
            return 1
        if args.format == "json":  # the admin API's answer: each approval with its `shown` view
            print(json.dumps(body, indent=2, ensure_ascii=True))
            return 0
        from .approvals.listing import context_lines
        pending = body.get("pending") or []
        recent = body.get("recent") or []
        assert isinstance(pending, list) and isinstance(recent, list)
        print(f"{len(pending)} pending")
        for a in pending:
            print("  " + _show(a))
            for line in context_lines(a):
                print("      " + scrub(line))
        if recent:
            print("recent")
            for a in recent[:10]:
                print("  " + _show(a))
        return 0
    if not args.id:
        print("error: approve and deny need an approval id", file=sys.stderr)
        return 2
    payload: dict[str, object] = {"by": args.by}
    if args.reason:
        payload["reason"] = args.reason
    status, body = _admin(args, "POST", f"/v1/approvals/{args.id}/{args.action}", payload)
    if status == 200:
        print(_show(body))
        return 0
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else body
    print(f"error: HTTP {status}: {message}", file=sys.stderr)
    return 1


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit.chain import verify_targets

    if args.action == "calls":
        return _audit_calls(args)
    if args.merged:
        from .audit.verify_cli import verify_merged

        return verify_merged(args.files, public_keys=args.public_key or (),
                             hmac_keys=args.hmac_key_file or (),
                             require_signed_tail=args.require_signed_tail, partial=args.partial,
                             as_json=args.json)
    if args.public_key or args.hmac_key_file or args.require_signed_tail:
        print("error: signed chain heads are checked per instance: add --merged",
              file=sys.stderr)
        return 2
    try:
        problems = verify_targets(args.files, from_genesis=not args.partial)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {' '.join(args.files)}: the chain is intact")
    return 1 if problems else 0


def _audit_calls(args: argparse.Namespace) -> int:
    from .audit.calls import AuditReadError, files_of, join, read, render_json, render_text

    try:
        lines = join(read(files_of(args.files)))
    except (AuditReadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = render_json(lines) if args.json else render_text(lines)
    if text:
        print(text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tether", description="Govern LLM agents' tool calls.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    p.add_argument("--version", action="version", version=f"tether {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", required=True, help="the config YAML")
    s.add_argument("--host", default=None, help="listen address (default from config)")
    s.add_argument("--port", type=int, default=None, help="proxy port (default 8080)")
    s.add_argument("--admin-port", type=int, default=None, help="admin port (default 9090)")
    s.add_argument("--forward-port", type=int, default=None,
                   help="HTTP_PROXY listener port (off unless given)")
    s.add_argument("--transparent-port", type=int, default=None,
                   help="transparent listener port for iptables REDIRECT "
                        "(default forward.transparent_port; off unless set)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="N processes share every port (default server.workers, 1); N > 1 "
                        "needs store: redis (docs/performance.md)")
    s.set_defaults(func=cmd_serve)

    ca = sub.add_parser("ca", help="the forward proxy's CA")
    ca.add_argument("action", choices=["export"], help="export: print the CA certificate (PEM)")
    ca.add_argument("--config", required=True, help="the config YAML (forward.ca_dir)")
    ca.set_defaults(func=cmd_ca)

    c = sub.add_parser("check", help="validate config and rule files: every error, then "
                                     "warnings")
    c.add_argument("files", nargs="+")
    c.add_argument("--format", choices=["text", "json"], default="text",
                   help="json: one document with every problem (for CI annotations)")
    c.set_defaults(func=cmd_check)
    add_setup_commands(sub)  # init, schema

    t = sub.add_parser("test", help="run policy test cases")
    t.add_argument("files", nargs="+")
    t.set_defaults(func=cmd_test)

    e = sub.add_parser("explain", help="show the decision on one call and every rule's verdict")
    e.add_argument("--config", required=True)
    e.add_argument("--tool", required=True)
    e.add_argument("--args", default="{}", help="the call's arguments as JSON text")
    e.add_argument("--agent", default=None)
    e.add_argument("--history", default=None, metavar="FILE",
                   help="the session's earlier calls, a YAML or JSON list (docs/flows.md)")
    e.set_defaults(func=cmd_explain)

    r = sub.add_parser("replay", help="re-decide recorded calls under a new policy")
    r.add_argument("files", nargs="+", metavar="AUDIT",
                   help="audit files oldest first, or one base path / directory")
    r.add_argument("--config", required=True, help="the new config YAML")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_replay)

    a = sub.add_parser("approvals", help="list, approve or deny held tool calls")
    a.add_argument("action", choices=["list", "approve", "deny"])
    a.add_argument("id", nargs="?", help="the approval id (apv_...)")
    a.add_argument("--reason", default=None)
    a.add_argument("--by", default=os.environ.get("USER", "cli"), help="recorded as the approver")
    a.add_argument("--admin-url", default="http://127.0.0.1:9090")
    a.add_argument("--token-env", default="TETHER_ADMIN_TOKEN")
    a.add_argument("--format", choices=["text", "json"], default="text",
                   help="list: text, or the admin API's JSON")
    a.set_defaults(func=cmd_approvals)

    au = sub.add_parser("audit", help="check the audit log's hash chain (verify), or list "
                                      "every tool call and how it ended (calls)")
    au.add_argument("action", choices=["verify", "calls"])
    au.add_argument("files", nargs="+", help="files oldest first, or one base path / directory "
                                             "(its rotated files are ordered .N ... .1, base)")
    au.add_argument("--partial", action="store_true",
                    help="the oldest file may start mid-chain (older files removed on purpose)")
    au.add_argument("--json", action="store_true",
                    help="calls: one JSON object per call and line, every value in full; "
                         "verify --merged: the report as one JSON object")
    au.add_argument("--merged", action="store_true",
                    help="verify: the files are a central copy (several instances, any order, "
                         "duplicates, NDJSON or RFC 5424 lines; - is stdin): report per instance "
                         "(docs/audit-verify.md)")
    au.add_argument("--public-key", action="append", metavar="PEM",
                    help="verify --merged: an Ed25519 public key that signs chain heads "
                         "(repeatable)")
    au.add_argument("--hmac-key-file", action="append", metavar="FILE",
                    help="verify --merged: an HMAC-SHA256 secret that signs chain heads "
                         "(repeatable)")
    au.add_argument("--require-signed-tail", action="store_true",
                    help="verify --merged: records after an instance's last signed head are an "
                         "error (default: a warning)")
    au.set_defaults(func=cmd_audit)

    ot = sub.add_parser("opa-test", help="run OPA test_* rules in .rego directories (no OPA binary)")
    ot.add_argument("dirs", nargs="+", metavar="DIR")
    ot.set_defaults(func=cmd_opa_test)

    demo.add_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
