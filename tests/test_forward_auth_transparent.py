"""Transparent mode under `auth.mode: required`, end to end in network namespaces (the
harness of tests/test_transparent.py): a redirected client cannot authenticate to a
proxy it does not know of, so its traffic is `forward.transparent_agent` (the pod
is the agent), or, with no agent configured, refused 401 and never sent (fail
closed). `tether serve` is the real CLI, so the authenticator it wires is tested.
Needs root, `ip netns`, iptables, curl and setpriv; skips otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_transparent import (
    DELETE,
    DESCRIBE,
    EC2,
    REDIRECT,
    TPORT,
    Pod,
    free_subnet,
    in_ns,
    preconditions,
    run,
    setup_netns,
    start,
    teardown,
)

POLICY = """
rules:
  - id: pod-agent-no-deletes
    match: {api: aws.ec2.DeleteVolume, agent: pod-agent}
    action: deny
    message: pod-agent never deletes volumes
"""


def serve(p: Pod, fake_ca: Path, agent: str | None) -> subprocess.Popen[str]:
    """(Re)start tether in the pod with `auth.mode: required`."""
    for proc in p.procs[1:]:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    del p.procs[1:]
    (p.work / "audit.jsonl").unlink(missing_ok=True)
    config = p.work / "tether.yaml"
    config.write_text(
        f"audit: {{path: {p.work / 'audit.jsonl'}}}\n"
        "auth: {mode: required}\n"
        "forward:\n"
        f"  ca_dir: {p.work / 'ca'}\n"
        f"  upstream_ca: {fake_ca}\n"
        f"  allow_private: [{EC2}]\n"   # TEST-ONLY: the fake cloud's address is private
        + (f"  transparent_agent: {agent}\n" if agent else "")
        + POLICY)
    return start(p, in_ns(p.pod, sys.executable, "-m", "proxy", "serve", "--config",
                          str(config), "--host", "127.0.0.1", "--port", "8080",
                          "--admin-port", "9090", "--transparent-port", str(TPORT)),
                 "tether: proxy on", 15)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pod, Path]]:
    python = preconditions()
    from tests.fakes.tls import make_fake_ca

    work = tmp_path_factory.mktemp("transparent-auth")
    shared = Path(tempfile.mkdtemp(prefix="tether-transparent-auth-"))
    shared.chmod(0o755)
    pid = os.getpid()
    p = Pod(f"tether-apod-{pid}", f"tether-acloud-{pid}", free_subnet(), python, shared, work)
    try:
        setup_netns(p)
        fake_ca = make_fake_ca(work / "fake-ca", names=(EC2,))
        start(p, in_ns(p.cloud, sys.executable, "-m", "tests.test_transparent", "fake",
                       str(work / "fake.jsonl"), str(fake_ca.cert_file), str(fake_ca.key_file)),
              "ready", 15)
        run(*in_ns(p.pod, "sh", str(REDIRECT)),
            env={**os.environ, "TETHER_UID": "0", "TETHER_TRANSPARENT_PORT": str(TPORT)})
        yield p, fake_ca.ca_file
    finally:
        teardown(p)


def test_transparent_traffic_is_the_configured_agent(pod: tuple[Pod, Path]) -> None:
    p, ca = pod
    serve(p, ca, "pod-agent")
    status, body, _ = p.curl(f"http://{EC2}{DESCRIBE}", "-H", "X-Tether-Agent: other")
    assert status == 200, body
    status, body, _ = p.curl(f"http://{EC2}{DELETE}")
    assert status == 403 and "pod-agent-no-deletes" in body
    assert p.seen("DeleteVolume") == []
    decisions = [(r["agent"], r["api"], r["action"]) for r in p.audit()
                 if r.get("kind") == "decision"]
    assert decisions == [("pod-agent", "aws.ec2.DescribeVolumes", "allow"),
                         ("pod-agent", "aws.ec2.DeleteVolume", "deny")]


def test_without_an_agent_transparent_traffic_is_refused(pod: tuple[Pod, Path]) -> None:
    p, ca = pod
    serve(p, ca, None)
    before = len(p.seen("DescribeVolumes"))
    status, body, headers = p.curl(f"http://{EC2}{DESCRIBE}", "-H", "X-Tether-Agent: pod-agent")
    assert status == 401, body
    assert "forward.transparent_agent" in body
    assert headers["www-authenticate"].endswith('realm="tether"')
    assert len(p.seen("DescribeVolumes")) == before  # nothing reached the cloud
    [record] = [r for r in p.audit() if r.get("kind") == "request"]
    assert (record["status"], record["code"], record["agent"]) == (401, "unauthenticated", None)
