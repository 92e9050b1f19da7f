"""Connecting to NATS the way the wmvae daemon does.

Role: the one place the package (and the examples) read the daemon's
``WMVAE_NATS__*`` settings from the environment and open a nats-py client
with them, so a publisher, a subscriber and the daemon share one set of
credentials:

    WMVAE_NATS__URL                       server URL(s), comma-separated
    WMVAE_NATS__USER, WMVAE_NATS__PASSWORD
    WMVAE_NATS__TOKEN
    WMVAE_NATS__NKEY_SEED                 an nkey user seed ("SU...")
    WMVAE_NATS__CREDS_FILE                a .creds file (user JWT + seed)
    WMVAE_NATS__TLS_CA_FILE               CA of the server's certificate
    WMVAE_NATS__TLS_CERT_FILE, WMVAE_NATS__TLS_KEY_FILE   client certificate
    WMVAE_NATS__INBOX_PREFIX              replies' inbox (_INBOX_<user>)
    WMVAE_NATS__PREFIX                    first subject token (default "wm")

It does not read the daemon's TOML config, retry a refused login (wrong
credentials end the call at once with ``ConnectionError``), or print
secrets. nkey and creds authentication need the ``nkeys`` package.

``python -m wmvae.connection [URL]`` checks a set of credentials (exit
status 0 when the server accepts them).
"""
import asyncio
import os
import ssl
import sys

import nats

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_PREFIX = "wm"


def setting(key):
    """The value of WMVAE_NATS__<KEY>, or "" when unset."""
    return os.environ.get(f"WMVAE_NATS__{key.upper()}", "")


def subject_prefix():
    """The daemon's subject prefix (``[nats] prefix``): "wm" unless set."""
    return setting("prefix") or DEFAULT_PREFIX


def connect_options(url=None):
    """nats.connect() keyword arguments from the environment; `url`
    (comma-separated servers) overrides WMVAE_NATS__URL."""
    servers = (url or setting("url") or DEFAULT_URL).split(",")
    options = {"servers": servers, "name": os.path.basename(sys.argv[0]) or "wmvae-python"}
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


async def connect(url=None, reconnect=False, **extra):
    """A nats-py client connected with wmvae's settings.

    The first connection fails at once (no endless reconnecting) when the
    server refuses the credentials or cannot be reached: ``ConnectionError``.
    With ``reconnect=True`` a client that was once connected then follows
    the servers through restarts and failovers for as long as it lives
    (publishers and long-running readers want that)."""
    errors = []

    async def remember(e):
        errors.append(e)

    # nats-py reads 0 attempts as "for ever": allow one retry, half a second on.
    options = {"allow_reconnect": False, "connect_timeout": 5, "max_reconnect_attempts": 1,
               "reconnect_time_wait": 0.5, "error_cb": remember}
    options.update(connect_options(url))
    options.update(extra)
    try:
        nc = await nats.connect(**options)
    except Exception as e:
        why = errors[-1] if errors else e
        raise ConnectionError(f"NATS at {','.join(options['servers'])} refused or unreachable: {why!r}") from None
    if reconnect:
        # nats-py reads these options when a connection drops, not only at
        # connect: from now on, reconnect to any server, without limit.
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
    return nc


async def check(url=None):
    """Connects, round-trips a PING and prints the server; raises
    ConnectionError when refused."""
    nc = await connect(url)
    await nc.flush(timeout=5)
    print(f"connected to {nc.connected_url.netloc} (server {nc.connected_server_version})")
    await nc.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        asyncio.run(check(argv[0] if argv else None))
    except ConnectionError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
