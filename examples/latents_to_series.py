#!/usr/bin/env python3
"""Turn wmvae's latents into the memory model's training data: replay
WM_LATENTS and write one .npz per finished episode (a latent with
done = true ends it), as World Models' series.py does:

    mu      float32 (N, z)   in step order
    logvar  float32 (N, z)
    action  float32 (N, A)   NaN where a frame had no action
    reward  float32 (N,)     NaN where a frame had none
    done    bool    (N,)
    step    uint64  (N,)

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
import re

import msgpack
import numpy as np
import wm_nats

STREAM = "WM_LATENTS"


def safe(name):
    """A file-name-safe form of a source or episode name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def write_episode(out_dir, source, episode, latents):
    """One episode's latents, in step order, as an .npz; returns its path."""
    latents = sorted(latents, key=lambda latent: latent["step"])
    width = max((len(latent.get("action") or []) for latent in latents), default=0)
    action = np.full((len(latents), width), np.nan, dtype=np.float32)
    for row, latent in zip(action, latents):
        given = latent.get("action") or []
        row[: len(given)] = given
    reward = [np.nan if latent.get("reward") is None else latent["reward"] for latent in latents]
    path = os.path.join(out_dir, f"{safe(source)}__{safe(episode)}.npz")
    np.savez(
        path,
        mu=np.asarray([latent["mu"] for latent in latents], dtype=np.float32),
        logvar=np.asarray([latent["logvar"] for latent in latents], dtype=np.float32),
        action=action,
        reward=np.asarray(reward, dtype=np.float32),
        done=np.asarray([bool(latent.get("done")) for latent in latents]),
        step=np.asarray([latent["step"] for latent in latents], dtype=np.uint64),
    )
    return path


async def main(args):
    os.makedirs(args.out, exist_ok=True)
    nc = await wm_nats.connect(args.url)
    js = nc.jetstream()
    last = (await js.stream_info(STREAM)).state.last_seq
    open_episodes = {}
    written = 0
    if last or args.follow:
        # An ordered consumer replays the stream from its first latent.
        sub = await js.subscribe("wm.latents.>", ordered_consumer=True)
        async for msg in sub.messages:
            latent = msgpack.unpackb(msg.data)
            source = msg.subject.split(".", 2)[2]
            if args.version is None or latent["model_version"] == args.version:
                key = (source, latent["episode"])
                open_episodes.setdefault(key, []).append(latent)
                if latent.get("done"):
                    print(write_episode(args.out, source, latent["episode"], open_episodes.pop(key)))
                    written += 1
            if not args.follow and msg.metadata.sequence.stream >= last:
                break
    await nc.close()
    print(f"{written} episodes written to {args.out}; {len(open_episodes)} not finished yet")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=None, help="NATS server (default: WMVAE_NATS__URL or nats://127.0.0.1:4222)")
    parser.add_argument("--out", required=True, help="folder for the .npz files")
    parser.add_argument("--version", type=int, default=None, help="only latents of this model version")
    parser.add_argument("--follow", action="store_true", help="keep reading new latents")
    asyncio.run(main(parser.parse_args()))
