"""Settings' NATS credentials as nats-py's connect() options.

Apart from client.py so the connection's identity is one small function to read and test: which
option each credential becomes, and the TLS context that checks the server.
"""

from __future__ import annotations

import ssl
from typing import Any

from snapscale.shared.core.settings import NatsAuth


def connect_options(auth: NatsAuth) -> dict[str, Any]:
    """The keyword arguments of `nats.connect` for `auth`; none for an anonymous connection."""
    opts: dict[str, Any] = {}
    if auth.user:
        opts.update(user=auth.user, password=auth.password or "")
    if auth.token:
        opts["token"] = auth.token
    if auth.creds_file:
        opts["user_credentials"] = str(auth.creds_file)
    if auth.nkey_seed_file:
        opts["nkeys_seed"] = str(auth.nkey_seed_file)
    if auth.tls:
        opts["tls"] = tls_context(auth)
    if auth.inbox_prefix != "_INBOX":
        opts["inbox_prefix"] = auth.inbox_prefix
    return opts


def tls_context(auth: NatsAuth) -> ssl.SSLContext:
    """Verify the server against `ca_file` (else the system's CAs); present a client certificate
    when one is configured (a server with `verify: true` asks for it)."""
    ctx = ssl.create_default_context(cafile=str(auth.ca_file) if auth.ca_file else None)
    if auth.cert_file and auth.key_file:
        ctx.load_cert_chain(str(auth.cert_file), str(auth.key_file))
    return ctx
