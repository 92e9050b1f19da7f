#!/usr/bin/env python3
"""Read wmvae's latents as a downstream model (M) would: every latent in
WM_LATENTS from the start, then live. Needs nats-py and msgpack (the
project's .venv has both).

    .venv/bin/python examples/latent_subscriber.py [nats://127.0.0.1:4222]

Credentials and TLS come from the daemon's WMVAE_NATS__* variables
(see examples/wm_nats.py).
"""
import asyncio
import sys

import msgpack
import wm_nats


async def main(url):
    nc = await wm_nats.connect(url)
    js = nc.jetstream()
    # An ephemeral ordered consumer replays the stream from the first latent.
    sub = await js.subscribe("wm.latents.>", ordered_consumer=True)
    async for msg in sub.messages:
        latent = msgpack.unpackb(msg.data)
        source = msg.subject.split(".", 2)[2]
        mu = latent["mu"]
        print(f"{source} {latent['episode']}:{latent['step']} v{latent['model_version']} "
              f"mu[:4]={[round(x, 3) for x in mu[:4]]}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
