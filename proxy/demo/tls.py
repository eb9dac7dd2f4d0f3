"""A CA of the fake upstreams' own (the demo's fake clouds, the tests' fakes), so tether
has to be told to trust it, as it would a private CA.

Built with mitmproxy's certificate helpers (a leaf signed by the CA, carrying
the CA's key, as mitmproxy's own leaves do): enough for a fake on loopback.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import create_ca, dummy_cert


@dataclass(frozen=True)
class FakeCA:
    ca_file: Path   # the CA certificate (PEM): what a client must trust
    cert_file: Path  # the leaf for `localhost` / 127.0.0.1
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def make_fake_ca(directory: Path, names: tuple[str, ...] = ("localhost",)) -> FakeCA:
    directory.mkdir(parents=True, exist_ok=True)
    key, ca = create_ca(organization="tether fakes", cn="tether fake upstream CA", key_size=2048)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    leaf = dummy_cert(key, ca, names[0], sans)
    ca_file, cert_file, key_file = (directory / "ca.pem", directory / "leaf.pem",
                                    directory / "leaf-key.pem")
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.to_pem())
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return FakeCA(ca_file, cert_file, key_file)
