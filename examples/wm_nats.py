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

The logic lives in the wmvae package (python/wmvae/connection.py,
`pip install ./python`); this file re-exports it for the examples and runs
from a checkout without the install. nkey and creds authentication need the
`nkeys` package (the project's .venv has it, with nats-py).
"""
import os
import sys

try:
    import wmvae  # noqa: F401
except ImportError:  # a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from wmvae.connection import DEFAULT_URL, check, connect, connect_options, main, setting  # noqa: E402,F401

if __name__ == "__main__":
    main()
