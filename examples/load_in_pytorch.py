#!/usr/bin/env python3
"""Fetch the active checkpoint's weights from the JetStream object store into
a plain PyTorch module and reconstruct a frame. The active version is the
latest announcement on wm.checkpoints (a rollback's `to`, else the newest
`created`). Uses scripts/torch_reference.py's VAE (same state_dict names).

    .venv/bin/python examples/load_in_pytorch.py [nats://127.0.0.1:4222] [out.png]

Credentials and TLS come from the daemon's WMVAE_NATS__* variables
(see examples/wm_nats.py).
"""
import asyncio
import io
import os
import sys

import msgpack
import nats
import wm_nats
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from torch_reference import VAE  # noqa: E402


async def active_version(js):
    """Replays WM_CHECKPOINTS and returns the active version at its end."""
    sub = await js.subscribe("wm.checkpoints", ordered_consumer=True)
    active = None
    while True:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except nats.errors.TimeoutError:
            return active
        event = msgpack.unpackb(msg.data)
        if event["event"] == "created":
            active = event["version"]
        elif event["event"] == "rollback":
            active = event["to"]


async def main(url, out):
    nc = await wm_nats.connect(url)
    js = nc.jetstream()
    version = await active_version(js)
    if version is None:
        sys.exit("no checkpoint announced yet")
    bucket = await js.object_store("wm-checkpoints")
    obj = await bucket.get(f"vae/v{version}.safetensors")
    vae = VAE()
    vae.load_state_dict(load(obj.data))
    vae.eval()
    # A CarRacing-like frame: grass, a road, the car.
    frame = np.full((64, 64, 3), (102, 204, 102), np.uint8)
    frame[:, 24:40] = (107, 107, 107)
    frame[44:50, 30:33] = (204, 0, 0)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
        recon = vae.decoder(mu)
    pic = (recon[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(np.concatenate([frame, pic], axis=1)).resize((256, 128), Image.NEAREST).save(out)
    print(f"v{version}: mu[:4]={mu[0, :4].tolist()}; frame and reconstruction written to {out}")
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None,
                     sys.argv[2] if len(sys.argv) > 2 else "reconstruction.png"))
