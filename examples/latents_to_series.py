#!/usr/bin/env python3
"""Turn wmvae's latents into the memory model's training data: replay
WM_LATENTS (wmvae.latents) and write one .npz per finished episode (a
latent with done = true ends it), as World Models' series.py does, in the
series layout wmvae.read_series reads (PROTOCOL of `wmvae series`):

    index.json  [{"source", "episode", "file", "frames"}, ...]
    mu      float32 (N, z)   in step order
    logvar  float32 (N, z)
    action  float32 (N, A)   NaN where a frame had no action
    reward  float32 (N,)     NaN where a frame had none
    done    bool    (N,)
    step    int64   (N,)
    version int64   ()       the model version that encoded the episode (-1: several)
    sha256  str     ()       that version's weights, as announced ("" if unknown)

    .venv/bin/python examples/latents_to_series.py --out series/ [--version V] [--follow] [URL]

Without --follow it stops once it has read every latent that was in the
stream when it started. --version V keeps only latents that version encoded
(an episode whose frames span versions then has gaps: its steps say where).
Files are named <source>__<episode>.npz. Credentials and TLS come from the
daemon's WMVAE_NATS__* variables (see examples/wm_nats.py).
"""
import argparse
import asyncio
import os
import sys

try:
    import wmvae
except ImportError:  # a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import wmvae
from wmvae import checkpoints, series  # noqa: E402


async def main(args):
    os.makedirs(args.out, exist_ok=True)
    nc = await wmvae.connect(args.url, reconnect=True)
    js = nc.jetstream()
    hashes = {-1: ""}

    async def sha256_of(version):
        if version not in hashes:
            event = await checkpoints.announcement(js, version)
            hashes[version] = event["sha256"] if event else ""
        return hashes[version]

    open_episodes, index = {}, []
    async for latent in wmvae.latents(">", connection=nc, follow=args.follow, version=args.version):
        key = (latent["source"], latent["episode"])
        open_episodes.setdefault(key, []).append(latent)
        if latent["done"]:
            arrays = series.arrays_from_latents(open_episodes.pop(key))
            arrays["sha256"] = await sha256_of(int(arrays["version"]))
            entry = series.write_episode(args.out, key[0], key[1], arrays)
            index.append(entry)
            series.write_index(args.out, index)
            print(os.path.join(args.out, entry["file"]), flush=True)
    series.write_index(args.out, index)
    await nc.close()
    print(f"{len(index)} episodes written to {args.out}; {len(open_episodes)} not finished yet")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=None, help="NATS server (default: WMVAE_NATS__URL or nats://127.0.0.1:4222)")
    parser.add_argument("--out", required=True, help="folder for the .npz files")
    parser.add_argument("--version", type=int, default=None, help="only latents of this model version")
    parser.add_argument("--follow", action="store_true", help="keep reading new latents")
    asyncio.run(main(parser.parse_args()))
