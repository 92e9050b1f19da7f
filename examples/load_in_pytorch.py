#!/usr/bin/env python3
"""Fetch the active checkpoint's weights from the JetStream object store into
a plain PyTorch module and reconstruct a frame, with wmvae.load_vae: the
active version is KV wm-meta's `active` (what every encoder uses), its
weights' sha256 checked against it before loading.

    .venv/bin/python examples/load_in_pytorch.py [nats://127.0.0.1:4222] [out.png]

Credentials and TLS come from the daemon's WMVAE_NATS__* variables
(see examples/wm_nats.py).
"""
import os
import sys

import numpy as np
from PIL import Image

try:
    import wmvae
except ImportError:  # a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import wmvae


def main(url, out):
    try:
        vae = wmvae.load_vae("active", url, timeout=10)
    except LookupError as e:
        sys.exit(f"no checkpoint yet: {e}")
    # A CarRacing-like frame: grass, a road, the car.
    frame = np.full((64, 64, 3), (102, 204, 102), np.uint8)
    frame[:, 24:40] = (107, 107, 107)
    frame[44:50, 30:33] = (204, 0, 0)
    mu, logvar = vae.encode(frame)
    pic = vae.decode(mu)
    Image.fromarray(np.concatenate([frame, pic], axis=1)).resize((256, 128), Image.NEAREST).save(out)
    print(f"v{vae.version}: mu[:4]={mu[:4].tolist()}; frame and reconstruction written to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2] if len(sys.argv) > 2 else "reconstruction.png")
