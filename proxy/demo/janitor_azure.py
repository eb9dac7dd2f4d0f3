"""`tether demo --cloud azure`: the janitor's mistake on Azure, judged by looked-up tags.

The janitor lists its resource group's managed disks through Azure Resource
Manager, reads `production-candidate` as disposable (the mistake of the real
incident) and deletes that disk and the `temporary` one: ARM DELETEs that name a
disk and carry none of its tags. It calls ARM as any script does, through
HTTPS_PROXY set to tether's forward proxy, and follows the long-running delete
by polling its `Azure-AsyncOperation` URL. Before judging each delete, tether asks
ARM's Tags API for the disk's tags with its own identity (`cloud.lookups.azure`,
a client secret from the environment, azure-identity), so the rules decide on
what the disk is, not on what the agent says it is. A scripted operator confirms
the held delete through the admin API.

Offline: a fake ARM and a fake Entra ID on loopback, over TLS with a CA of their
own that tether is told to trust (`forward.upstream_ca`), and a resolver that
sends `management.azure.com` to the fake. The table is read back from the audit log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import ssl
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web

from .. import config as config_mod
from ..egress import Egress
from ..forward.ca import export_pem
from ..forward.master import start_forward
from ..forward.targets import Address
from ..server.app import CONTEXT, bound_port, build, start
from .fake_arm import CLIENT_ID, CLIENT_SECRET, SUB, TENANT, FakeArm, FakeEntra
from .janitor import TOKEN_ENV, operator
from .tls import FakeCA, make_fake_ca

ARM = "management.azure.com"
GROUP = "rg-ops"
API_VERSION = "2024-03-02"
AGENT_TOKEN = "agent-token"  # the janitor's own ARM token; tether never uses it


async def _serve_tls(app: web.Application, ca: FakeCA) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ca.server_context()).start()
    return runner, bound_port(runner)


async def _to_fake(host: str, port: int) -> list[Address]:
    """The demo's DNS: ARM is the fake on loopback; nothing else resolves."""
    return [ipaddress.ip_address("127.0.0.1")] if host == ARM else []


async def _delete(http: aiohttp.ClientSession, url: str, out: TextIO, name: str) -> None:
    """One disk delete as the SDKs make it: DELETE, then poll the operation to its end."""
    async with http.delete(url) as resp:
        body = await resp.read()
        if resp.status != 202:
            error = json.loads(body or b"{}").get("error", {})
            print(f"  agent: DELETE {name} -> HTTP {resp.status} {error.get('code', '')}: "
                  f"{error.get('message', '')}", file=out)
            return
        poll = resp.headers["Azure-AsyncOperation"]
    status = "InProgress"
    while status == "InProgress":
        async with http.get(poll) as resp:
            status = (await resp.json())["status"]
    print(f"  agent: DELETE {name} -> 202, operation polled to {status}", file=out)


def _table(records: list[dict[str, Any]], outcomes: list[dict[str, Any]], out: TextIO) -> None:
    rows = [("#", "operation", "disk", "tags tether looked up", "verdict", "rules")]
    for i, r in enumerate(records, 1):
        args = r.get("arguments") or {}
        tags = args.get("Tags")
        verdict = r["action"].upper()
        if r["action"] == "hold":
            found = next((o for o in outcomes if o.get("decision_id") == r.get("decision_id")),
                         None)
            if found:
                verdict = f"HOLD->{found['outcome'].upper()} by {found['by']}"
        rows.append((str(i), r["api"], str(args.get("resourceName") or "-"),
                     json.dumps(tags, separators=(",", ":")) if tags is not None else "-",
                     verdict, ", ".join(r["rules"]) or "-"))
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    for row in rows:
        print("  " + "  ".join(row[c].ljust(widths[c]) for c in range(6)).rstrip(), file=out)


async def run_azure_demo(rules: str | None = None, out: TextIO | None = None,
                         workdir: Path | None = None) -> int:
    import sys

    out = out or sys.stdout
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tether-demo-azure-"))
    rules_text = (Path(rules).read_text(encoding="utf-8") if rules else
                  resources.files("proxy.demo").joinpath("janitor_azure.yaml")
                  .read_text("utf-8"))
    (workdir / "janitor_azure.yaml").write_text(rules_text, encoding="utf-8")
    audit_path = workdir / "audit.jsonl"
    ca = make_fake_ca(workdir / "fake-ca", names=("localhost", ARM))
    arm, entra = FakeArm(), FakeEntra()
    arm_runner, arm_port = await _serve_tls(arm.app(), ca)
    entra_runner, entra_port = await _serve_tls(entra.app(), ca)
    # tether's own identity: a client secret in its environment, its tenant at the fake.
    os.environ.update({"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT_ID,
                       "AZURE_CLIENT_SECRET": CLIENT_SECRET,
                       "AZURE_AUTHORITY_HOST": f"https://localhost:{entra_port}",
                       TOKEN_ENV: secrets.token_hex(16)})
    endpoint = f"https://{ARM}:{arm_port}"
    cfg_path = workdir / "tether.yaml"
    cfg_path.write_text(
        f"include: [janitor_azure.yaml]\naudit: {{path: {audit_path}}}\n"
        f"admin: {{token_env: {TOKEN_ENV}}}\napprovals: {{keepalive: 1s}}\n"
        f"forward: {{ca_dir: {workdir / 'tether-ca'}, upstream_ca: {ca.ca_file}, "
        f"allow_private: [{ARM}]}}\n"
        f"cloud:\n  lookups:\n    azure: {{tags: true, endpoint: '{endpoint}', "
        "credential: environment}\n", encoding="utf-8")
    cfg = config_mod.load(cfg_path, env={})
    tether = build(cfg)
    runners = await start(tether, host="127.0.0.1", port=0, admin_port=0)
    proxy_port, admin_url = bound_port(runners[0]), f"http://127.0.0.1:{bound_port(runners[1])}"
    forward = await start_forward(
        tether.governor, tether.governor.metrics, cfg.forward, host="127.0.0.1", port=0,
        reverse=("127.0.0.1", proxy_port), own_ports=(bound_port(runners[1]),),
        resolver=_to_fake, auth=tether.proxy[CONTEXT].auth,
        egress=Egress(cfg.apis, cfg.cloud, tether.holds, cfg.agent_keys,
                      cfg.trust_identity_headers, cfg.lookups, opa=tether.opa,
                      linked=tether.linked))
    trust = ssl.create_default_context(cadata=export_pem(cfg.forward.ca_dir))
    proxy_url = f"http://127.0.0.1:{forward.port}"
    approver = asyncio.create_task(operator(admin_url, out), name="demo-operator")
    print("tether demo --cloud azure: the janitor on Azure, offline\n", file=out)
    print(f"  agent -> HTTPS_PROXY {proxy_url} (tether) -> fake ARM {endpoint}", file=out)
    print(f"  tether looks disk tags up at ARM's Tags API as itself (fake Entra ID "
          f":{entra_port}); policy: {rules or 'janitor_azure.yaml (packaged)'}\n", file=out)
    disks = f"{endpoint}/subscriptions/{SUB}/resourceGroups/{GROUP}/providers/" \
            "Microsoft.Compute/disks"
    try:
        async with aiohttp.ClientSession(
                proxy=proxy_url, connector=aiohttp.TCPConnector(ssl=trust),
                headers={"Authorization": f"Bearer {AGENT_TOKEN}"}) as http:
            async with http.get(f"{disks}?api-version={API_VERSION}") as resp:
                listing = (await resp.json())["value"]
            seen = ", ".join(f"{d['name']} ({d['tags'].get('env', 'untagged')})"
                             for d in listing)
            print(f"  agent lists the disks: {seen}", file=out)
            doomed = [d["name"] for d in listing
                      if d["tags"].get("env") in ("temporary", "production-candidate")]
            print(f"  model: {', '.join(doomed)} look temporary, deleting them", file=out)
            for name in doomed:
                await _delete(http, f"{disks}/{name}?api-version={API_VERSION}", out, name)
    finally:
        approver.cancel()
        await forward.stop()
        for runner in reversed([arm_runner, entra_runner, *runners]):
            await runner.cleanup()
        await tether.close()

    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"
                 and str(r.get("api", "")).endswith("/delete")]
    outcomes = [r for r in records if r["kind"] == "hold"]
    print("\nwhat tether decided on the deletes (read back from the audit log):\n", file=out)
    _table(decisions, outcomes, out)
    left = ", ".join(f"{name} ({tags.get('env', 'untagged')})" for name, tags in arm.disks.items())
    print(f"\n  deleted in ARM:  {', '.join(sorted(set(doomed) - set(arm.disks))) or 'nothing'}",
          file=out)
    print(f"  still in ARM:    {left}", file=out)
    print(f"  tags looked up:  {len(arm.lookups)} (ARM's Tags API, as tether, token from "
          f"Entra ID {len(entra.tokens)} time(s))", file=out)
    print(f"  audit log: {audit_path} ({len(records)} records)", file=out)
    return 0
