"""The keys of the sections that say how the process runs and whom it talks to: ports
and limits, audit, upstreams, identity, approvals, OPA, the forward proxy, telemetry.
(config_tables.py holds the policy's sections and the top level.)"""

from __future__ import annotations

from .config_keys import Key, table

SERVER = table(
    "server",
    Key("host", "string", "listen address", "127.0.0.1"),
    Key("port", "integer", "the proxy port (tether serve --port overrides it)", 8080),
    Key("admin_port", "integer", "the admin port: approvals, metrics, health", 9090),
    Key("header_timeout", "duration", "a request head must arrive in full within this", "10s"),
    Key("idle_timeout", "duration", "a kept-alive connection with no request is closed after "
        "this", "60s"),
    Key("body_timeout", "duration", "a request body must arrive in full within this of its "
        "head", "60s"),
    Key("max_connections", "integer", "open client connections per port; one more is "
        "answered 503", 1024),
    Key("drain_timeout", "duration", "at SIGTERM, how long running requests may finish",
        "10s"),
    Key("event_loop", "string", "the event loop: asyncio's own, uvloop (must be installed), "
        "or auto (uvloop when installed)", "asyncio",
        values=("auto", "asyncio", "uvloop")),
    Key("workers", "integer", "processes sharing every port (tether serve --workers wins; "
        "more than 1 needs store: redis)", 1),
)
LIMITS = table(
    "limits",
    Key("max_body_bytes", "integer", "the largest request body accepted", 10485760),
    Key("max_response_bytes", "integer", "the largest upstream answer read", 67108864),
    Key("max_arguments_bytes", "integer", "one tool call's arguments; in a stream, what is "
        "held back at once", 4194304),
    Key("upstream_timeout", "number", "seconds an upstream may take to answer", 600),
)
SIGN = table(
    "audit.sign",
    Key("alg", "string", "how chain heads are signed", "ed25519",
        values=("ed25519", "hmac-sha256")),
    Key("key_file", "string", "the signing key (a mounted secret), relative to the config",
        required=True),
    Key("interval", "duration", "a signed chain head at least this often", 60),
)
TLS = table(
    "audit.sinks[].tls",
    Key("ca_file", "string", "the CA to trust (default: the system's)"),
    Key("cert_file", "string", "a client certificate, for receivers that ask for one"),
    Key("key_file", "string", "its key"),
    Key("server_name", "string", "the name the certificate must carry (default: host)"),
    Key("verify", "boolean", "check the receiver's certificate", True),
)
BATCH = table(
    "audit.sinks[].batch",
    Key("records", "integer", "records per batch at most", 500),
    Key("bytes", "integer", "bytes per batch at most", 1048576),
)
BACKOFF = table(
    "audit.sinks[].backoff",
    Key("min", "duration", "the first retry's wait", 0.5),
    Key("max", "duration", "the longest wait between retries", 30),
)
SINK = table(
    "audit.sinks[]",
    Key("name", "string", "names its cursor file and metric label (default: the type)"),
    Key("type", "string", "where records go", values=("stdout", "file", "syslog", "otlp",
                                                      "http"), required=True),
    Key("required", "boolean", "fail closed once it has been down longer than max_outage",
        False),
    Key("max_outage", "duration", "how long a required sink may be down", "5m"),
    Key("batch", "mapping", "how much is shipped at once", keys=BATCH),
    Key("backoff", "mapping", "retry waits after a failure", keys=BACKOFF),
    Key("timeout", "duration", "per shipment", "10s"),
    Key("path", "string", "file: the copy's path"),
    Key("fsync", "boolean", "file: fsync each batch", True),
    Key("host", "string", "syslog: the receiver"),
    Key("port", "integer", "syslog: its port (default 514, 6514 with tls)"),
    Key("tls", "any", "syslog: true, or the TLS settings (ca_file, cert_file, key_file, "
        "server_name, verify)"),
    Key("facility", "string", "syslog facility (kern, user, daemon, auth, authpriv, "
        "local0-7)", "local0"),
    Key("hostname", "string", "syslog HOSTNAME (default: this host's name)"),
    Key("app_name", "string", "syslog APP-NAME", "tether"),
    Key("endpoint", "string", "otlp: the OTLP/HTTP logs URL",
        "http://127.0.0.1:4318/v1/logs"),
    Key("url", "string", "http: the URL records are POSTed to"),
    Key("headers", "map", "otlp, http: extra request headers", value="string"),
    Key("headers_env", "map", "otlp, http: header name -> environment variable holding its "
        "value", value="string"),
    Key("bearer_token_env", "string", "http: an environment variable holding a bearer token"),
)
SPOOL = table(
    "audit.spool",
    Key("max_bytes", "integer", "unshipped bytes (slowest sink) before writes are refused",
        536870912),
    Key("drain_timeout", "duration", "how long shutdown waits for the sinks to catch up",
        "20s"),
    Key("poll_interval", "duration", "how often an idle sink looks for new records", 0.1),
)
AUDIT = table(
    "audit",
    Key("path", "string", "the local hash-chained log, relative to the config; null: off",
        "audit.jsonl", nullable=True),
    Key("max_bytes", "integer", "rotate before a file would exceed this; null: never",
        104857600, nullable=True),
    Key("keep", "integer", "rotated files kept; null: all", None, nullable=True),
    Key("fsync", "string", "never, per record, or at most every fsync_interval", "interval",
        values=("never", "always", "interval")),
    Key("fsync_interval", "number", "seconds between fsyncs (fsync: interval)", 1.0),
    Key("redact", "strings", "dotted paths inside tool arguments masked in records", []),
    Key("instance", "string", "this chain's name (default: TETHER_INSTANCE, POD_NAME, the "
        "host name)"),
    Key("sign", "mapping", "signed chain heads", keys=SIGN),
    Key("sinks", "list", "where records are shipped (docs/audit-shipping.md)", each=SINK),
    Key("spool", "mapping", "the local files as the sinks' spool", keys=SPOOL),
)
ADMIN = table(
    "admin",
    Key("token_env", "string", "the environment variable holding the admin bearer token",
        "TETHER_ADMIN_TOKEN"),
)
IDENTITY = table(
    "identity",
    Key("trust_headers", "boolean", "X-Tether-Session and X-Tether-Agent name the session "
        "and agent", True),
)
APPROVALS = table(
    "approvals",
    Key("timeout", "duration", "a hold rule without its own timeout waits this long", "10m"),
    Key("ticket_validity", "duration", "an approved ticket may be redeemed this long", "1h"),
    Key("max_pending", "integer", "past these, new holds are denied at once", 100),
    Key("max_pending_per_session", "integer", "the same, per session", 5),
    Key("keepalive", "duration", "SSE comment interval while a stream waits", "15s"),
    Key("keep_decided", "integer", "ended approvals listed by GET /v1/approvals", 500),
    Key("keep_decided_for", "duration", "how long they stay readable (store: redis)", "24h"),
    Key("lease", "duration", "store: redis: a replica silent this long is dead; its holds "
        "end abandoned", "15s"),
)
SLACK = table(
    "slack",
    Key("channel", "string", "the channel id approvals are posted in", required=True),
    Key("approvers", "strings", "Slack user ids whose clicks count", required=True),
    Key("bot_token_env", "string", "the environment variable holding the bot token",
        "SLACK_BOT_TOKEN"),
    Key("signing_secret_env", "string", "the environment variable holding the signing secret",
        "SLACK_SIGNING_SECRET"),
    Key("api_url", "string", "Slack's Web API (TETHER_UPSTREAM_SLACK overrides it)",
        "https://slack.com/api"),
)
UPSTREAM = table(
    "upstreams.NAME",
    Key("url", "string", "the base URL (TETHER_UPSTREAM_NAME overrides it)", required=True),
    Key("api_key_env", "string", "the environment variable holding tether's key for it"),
    Key("api_key_file", "string", "or a file holding it (a mounted Secret), re-read on change"),
    Key("agent_credentials", "string", "pass: the agent's own credentials go upstream too",
        "strip", values=("strip", "pass")),
    Key("region", "string", "bedrock: the AWS region (default: from the URL)"),
    Key("ca_file", "string", "an extra CA to trust for its TLS"),
    Key("aws_credentials_file", "string", "bedrock: an AWS shared-credentials file"),
    Key("aws_profile", "string", "bedrock: its profile"),
    Key("batches", "string", "openai, azure, anthropic: refuse batches that declare tools, or "
        "all", "refuse_tools", values=("refuse_tools", "refuse")),
)
FORWARD = table(
    "forward",
    Key("ca_dir", "string", "the forward proxy's CA, relative to the config", ".tether/ca"),
    Key("allow_private", "strings", "private hosts, addresses or CIDRs tools may reach", []),
    Key("pass_hosts", "strings", "hosts forwarded with no policy (exact or *.suffix)", []),
    Key("upstream_ca", "string", "an extra CA bundle trusted for upstream TLS"),
    Key("transparent_port", "integer", "the transparent listener (iptables REDIRECT target)"),
    Key("transparent_agent", "string", "the agent all transparent traffic is"),
)
JWT = table(
    "auth.jwt",
    Key("issuer", "string", "the iss the tokens carry", required=True),
    Key("audiences", "string|strings", "accepted aud values", required=True),
    Key("jwks_url", "string", "the key set (default: OIDC discovery from the issuer)"),
    Key("jwks_file", "string", "or a key set file"),
    Key("ca_file", "string", "an extra CA for the key set fetch"),
    Key("token_file", "string", "a bearer token for the key set fetch"),
    Key("algorithms", "string|strings", "accepted asymmetric algorithms", ["RS256", "ES256"]),
    Key("leeway", "integer", "seconds of clock skew allowed, at most 300", 30),
    Key("agent_claim", "string", "the claim (or dotted path) naming the agent", "sub"),
    Key("agents", "map", "claim value -> agent name", value="string"),
    Key("claims", "string|strings", "claims exposed to policy", []),
    Key("cache_ttl", "integer", "seconds a fetched key set is used", 300),
    Key("refetch_interval", "integer", "an unknown kid refetches at most this often "
        "(seconds)", 30),
)
AUTH = table(
    "auth",
    Key("mode", "string", "required: a request with no valid identity is refused (401)",
        "optional", values=("optional", "required")),
    Key("jwt", "mapping|list", "one token issuer, or a list of them", each=JWT),
)
OPA_CACHE = table(
    "opa.cache",
    Key("ttl", "number", "seconds a verdict is reused; 0: no cache", 5),
    Key("size", "integer", "verdicts kept", 10000),
)
OPA = table(
    "opa",
    Key("url", "string", "a remote OPA's Data API (or embedded)"),
    Key("embedded", "string", "a directory of .rego files evaluated in-process (or url)"),
    Key("path", "string", "the decision's path", "tether/decision"),
    Key("timeout", "number", "seconds per query", 0.25),
    Key("cache", "mapping", "verdicts by input", keys=OPA_CACHE),
    Key("token_env", "string", "remote: an environment variable holding a bearer token"),
)
TELEMETRY = table(
    "telemetry",
    Key("legacy_gen_ai_system", "boolean", "inference spans also carry the deprecated "
        "gen_ai.system", False),
)
