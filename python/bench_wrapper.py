#!/usr/bin/env python3
"""What LatentObservation adds to a CarRacing-v3 step: the preprocessing
(crop, PIL bilinear resize) and the VAE's encoder on the CPU at batch 1,
plus, with --publish, building the frame message and handing it to the
publisher's background loop (the acks are waited for off the step).

    .venv/bin/python python/bench_wrapper.py [--steps 300] [--threads 1]
        [--nats-url URL [--publish]] [--json]

Without --nats-url the model has fresh random weights (the cost does not
depend on them) and nothing is published. The added time is measured
directly around the wrapper's own work in each step (step time of the
wrapped env minus that of the bare env, on the same frames), and printed
as median and 90th percentile in milliseconds.

Measures only; asserts nothing.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import wmvae  # noqa: E402
from wmvae.model import VAE  # noqa: E402


class Timed(gym.Wrapper):
    """The bare env's step time, measured inside the wrapper stack."""

    def __init__(self, env):
        super().__init__(env)
        self.last = 0.0

    def step(self, action):
        start = time.perf_counter()
        out = self.env.step(action)
        self.last = time.perf_counter() - start
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="LatentObservation's torch_threads (0: leave torch's default)")
    p.add_argument("--nats-url", help="load the active version from this daemon (else random weights)")
    p.add_argument("--publish", action="store_true", help="also publish each frame (needs --nats-url)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    timed = Timed(gym.make("CarRacing-v3", render_mode="rgb_array"))
    model = None if args.nats_url else VAE().eval()
    env = wmvae.LatentObservation(timed, nats_url=args.nats_url, publish=args.publish, model=model,
                                  source="bench-wrapper", torch_threads=args.threads or None)
    added = []
    rng = np.random.default_rng(0)
    try:
        env.reset(seed=0)
        for step in range(args.steps):
            action = np.array([rng.uniform(-0.3, 0.3), 0.3, 0.0], np.float32)
            start = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(action)
            total = time.perf_counter() - start
            if step >= 10:  # warm-up: first calls allocate
                added.append((total - timed.last) * 1000)
            if terminated or truncated:
                env.reset()
        env.flush() if args.publish else None
    finally:
        env.close()
    added.sort()
    result = {
        "bench": "latent-observation-added-ms",
        "steps": len(added),
        "publish": args.publish,
        "torch_threads": torch.get_num_threads(),
        "added_ms_p50": statistics.median(added),
        "added_ms_p90": added[int(0.9 * (len(added) - 1))],
        "added_ms_mean": statistics.fmean(added),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"LatentObservation adds {result['added_ms_p50']:.3f} ms per step (median; p90 {result['added_ms_p90']:.3f} ms, "
              f"mean {result['added_ms_mean']:.3f} ms) over {len(added)} CarRacing-v3 steps, torch threads "
              f"{result['torch_threads']}, publish {args.publish}")


if __name__ == "__main__":
    main()
