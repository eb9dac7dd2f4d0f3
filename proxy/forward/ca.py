"""tether's interception CA: made on first use, readable by tether alone.

mitmproxy's `confdir` layout is kept (`mitmproxy-ca.pem` holds key and
certificate, `mitmproxy-ca-cert.pem` the certificate only) so its CertStore
loads it as it is. Permissions are enforced on every start, not only at
creation: a directory copied in with loose modes is tightened, not trusted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mitmproxy.certs import CertStore

BASENAME = "mitmproxy"
KEY_SIZE = 2048
# Files holding the private key; everything else there is public.
SECRET_FILES = (f"{BASENAME}-ca.pem", f"{BASENAME}-ca.p12")
CERT_FILE = f"{BASENAME}-ca-cert.pem"


def ensure_ca(ca_dir: str | os.PathLike[str]) -> Path:
    """Create the CA in `ca_dir` unless it exists; fix modes (dir 0700, keys 0600).

    Returns the certificate file (PEM, no key)."""
    path = Path(ca_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if not (path / SECRET_FILES[0]).exists():
        CertStore.create_store(path, BASENAME, KEY_SIZE, organization="tether",
                               cn="tether forward proxy CA")
    for name in SECRET_FILES:
        secret = path / name
        if secret.exists() and stat.S_IMODE(secret.stat().st_mode) != 0o600:
            os.chmod(secret, 0o600)
    cert = path / CERT_FILE
    if not cert.exists():
        raise FileNotFoundError(f"{cert}: the CA certificate is missing (the key exists)")
    return cert


def export_pem(ca_dir: str | os.PathLike[str]) -> str:
    """The CA certificate as PEM text, for clients to trust. Never the key."""
    text = ensure_ca(ca_dir).read_text(encoding="ascii")
    if "PRIVATE KEY" in text:
        raise ValueError(f"{ca_dir}/{CERT_FILE} holds a private key; refusing to print it")
    return text
