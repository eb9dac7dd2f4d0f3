"""Agent authentication: who is calling, proven by a static key or a JWT.

settings.py parses the `auth:` config section; verify.py (JWT checks), jwks.py
(key sets and when to refetch them) and credentials.py (where the credential is
read) are sans-IO; jwks_fetch.py does the fetching with aiohttp and
authenticator.py puts them together for the front ends.
"""
