"""The fakes' CA: shipped with the demo (proxy/demo/tls.py), which runs fake clouds too."""

from proxy.demo.tls import FakeCA, make_fake_ca

__all__ = ["FakeCA", "make_fake_ca"]
