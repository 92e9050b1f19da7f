#!/usr/bin/env python3
"""Read wmvae's latents as a downstream model (M) would: every latent in
WM_LATENTS from the start, then live, through wmvae.latents() (the
project's .venv has what it needs; elsewhere `pip install ./python`).

    .venv/bin/python examples/latent_subscriber.py [nats://127.0.0.1:4222]

Credentials and TLS come from the daemon's WMVAE_NATS__* variables
(see examples/wm_nats.py).
"""
import asyncio
import os
import sys

try:
    import wmvae
except ImportError:  # a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import wmvae


async def main(url):
    # An ordered consumer replays the stream from the first latent, then follows it.
    async for latent in wmvae.latents(">", url):
        print(f"{latent['source']} {latent['episode']}:{latent['step']} v{latent['model_version']} "
              f"mu[:4]={[round(float(x), 3) for x in latent['mu'][:4]]}", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
    except KeyboardInterrupt:
        pass
