"""How tether authenticates itself to its upstreams, for every front end.

`keys`: the API keys tether holds (`api_key_env`, `api_key_file`), re-read when a
file rotates. `sigv4`: tether's own AWS credentials and the SigV4 signer (imported
only where Bedrock or an AWS lookup needs botocore). The reverse proxy (server/) and
the forward and transparent proxies (forward/) both use them, so they live below both.
"""
