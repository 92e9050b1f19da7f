#!/usr/bin/env python3
"""CarRacing-v3 frames to an .npy for `wmvae bench quality`: gymnasium
rendered headless, the example publisher's driving policy, raw 96x96 RGB.
Training and held-out files come from disjoint seeds:

    .venv/bin/python scripts/carracing_frames.py --seeds 0-9 --steps 500 --out train.npy
    .venv/bin/python scripts/carracing_frames.py --seeds 100-101 --steps 500 --out heldout.npy

Each seed is one episode (its track and its policy noise), --steps frames
long after the first 50 (the camera zooming in), uint8 (N, 96, 96, 3).
"""
import argparse
import os
import sys

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from carracing_publisher import policy  # noqa: E402

# The first frames zoom in from far above the track: not what the car sees.
ZOOM_STEPS = 50


def seeds(text):
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=seeds, required=True, help="A-B: one episode per seed")
    parser.add_argument("--steps", type=int, default=500, help="frames per episode")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = gym.make("CarRacing-v3", render_mode="rgb_array")
    frames = []
    for seed in args.seeds:
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        for step in range(ZOOM_STEPS + args.steps):
            obs, _, terminated, truncated, _ = env.step(policy(obs, step, rng))
            if step >= ZOOM_STEPS:
                frames.append(obs)
            if terminated or truncated:
                break
    np.save(args.out, np.stack(frames).astype(np.uint8))
    print(f"{args.out}: {len(frames)} frames from seeds {args.seeds.start}-{args.seeds.stop - 1}")


if __name__ == "__main__":
    main()
