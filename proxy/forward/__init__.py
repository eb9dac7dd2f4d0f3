"""HTTP_PROXY mode: a mitmproxy front end in tether's own process and event loop.

Importing this package does not import mitmproxy: the config loader reads
`forward.settings` whether or not a forward port is ever opened.
"""
