#!/usr/bin/env python3
"""Connect to NATS the way wmvae does: the same settings from the same
environment variables, so a publisher, a subscriber and the daemon share
one set of credentials:

    WMVAE_NATS__URL                       server URL(s), comma-separated
    WMVAE_NATS__USER, WMVAE_NATS__PASSWORD
    WMVAE_NATS__TOKEN
    WMVAE_NATS__NKEY_SEED                 an nkey user seed ("SU...")
    WMVAE_NATS__CREDS_FILE                a .creds file (user JWT + seed)
    WMVAE_NATS__TLS_CA_FILE               CA of the server's certificate
    WMVAE_NATS__TLS_CERT_FILE, WMVAE_NATS__TLS_KEY_FILE   client certificate

Run it on its own to check credentials (exit status 0 when the server
accepts them; secrets are never printed):

    .venv/bin/python examples/wm_nats.py [nats://127.0.0.1:4222]

nkey and creds authentication need the `nkeys` package (the project's
.venv has it, with nats-py).
"""
import asyncio
import os
import ssl
import sys

import nats

DEFAULT_URL = "nats://127.0.0.1:4222"


def setting(key):
    return os.environ.get(f"WMVAE_NATS__{key.upper()}", "")


def connect_options(url=None):
    """nats.connect() keyword arguments from the environment."""
    servers = (url or setting("url") or DEFAULT_URL).split(",")
    options = {"servers": servers, "name": os.path.basename(sys.argv[0]) or "wmvae-example"}
    if setting("inbox_prefix"):
        # Replies come to <prefix>.<id>: with config/nats-permissions.conf each
        # user may read only its own (_INBOX_publisher, _INBOX_reader, ...).
        options["inbox_prefix"] = setting("inbox_prefix").encode()
    if setting("password"):
        options.update(user=setting("user"), password=setting("password"))
    elif setting("token"):
        options["token"] = setting("token")
    elif setting("nkey_seed"):
        options["nkeys_seed_str"] = setting("nkey_seed")
    elif setting("creds_file"):
        options["user_credentials"] = setting("creds_file")
    if setting("tls_ca_file") or setting("tls_cert_file"):
        context = ssl.create_default_context(cafile=setting("tls_ca_file") or None)
        if setting("tls_cert_file"):
            context.load_cert_chain(setting("tls_cert_file"), setting("tls_key_file"))
        options["tls"] = context
    return options


async def connect(url=None, **extra):
    """A nats-py client connected with wmvae's settings; fails at once
    (no endless reconnecting) when the server refuses them."""
    errors = []

    async def remember(e):
        errors.append(e)

    # nats-py reads 0 attempts as "for ever": allow one retry, half a second on.
    options = {"allow_reconnect": False, "connect_timeout": 5, "max_reconnect_attempts": 1,
               "reconnect_time_wait": 0.5, "error_cb": remember}
    options.update(connect_options(url))
    options.update(extra)
    try:
        return await nats.connect(**options)
    except Exception as e:
        why = errors[-1] if errors else e
        raise ConnectionError(f"NATS at {','.join(options['servers'])} refused or unreachable: {why!r}") from None


async def check(url):
    nc = await connect(url)
    await nc.flush(timeout=5)
    print(f"connected to {nc.connected_url.netloc} (server {nc.connected_server_version})")
    await nc.close()


if __name__ == "__main__":
    try:
        asyncio.run(check(sys.argv[1] if len(sys.argv) > 1 else None))
    except ConnectionError as e:
        sys.exit(str(e))
