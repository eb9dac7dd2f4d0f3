"""Open Policy Agent: the remote Data API client, the embedded rego-cpp engine, the
cache and the `tether opa-test` runner. The pure parts (input document, answer
interpretation) are in proxy/policy/opa.py."""
