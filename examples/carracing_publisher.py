#!/usr/bin/env python3
"""Publish real CarRacing-v3 frames to wmvae: gymnasium rendered headless,
a simple driving policy, raw 96x96 RGB frames with action, reward and done,
several episodes in parallel, by the wire contract (PROTOCOL.md), through
wmvae.Publisher (message ids, retries through stream leader elections).

    .venv/bin/python examples/carracing_publisher.py [--nats-url URL] [--envs 4] [--episodes 0]
        [--max-steps 0] [--seed S]

Credentials and TLS come from the daemon's WMVAE_NATS__* variables
(see examples/wm_nats.py).

Needs gymnasium with box2d (`pip install "gymnasium[box2d]"`) and the wmvae
package (`pip install ./python`; from a checkout it is found without).
--episodes 0 runs until interrupted; --max-steps ends each episode
early (its last frame says done); --seed makes tracks and episode ids
repeatable (so is the validation split, chosen by hashing episode ids).
"""
import argparse
import asyncio
import os
import sys
import uuid

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

try:
    import wmvae  # noqa: E402
except ImportError:  # a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import wmvae  # noqa: E402


def policy(obs, step, rng):
    """Keep the grey road under the car: steer towards the road's centre in
    the rows just ahead, accelerate gently, brake now and then."""
    row = obs[60:66].astype(np.int16)
    road = (np.abs(row[..., 0] - row[..., 1]) < 15) & (row[..., 1] < 150)
    cols = np.nonzero(road.any(axis=0))[0]
    steer = 0.0 if cols.size == 0 else float(np.clip((cols.mean() - 48) / 20, -1, 1))
    gas = 0.3 if step % 40 < 35 else 0.0
    return np.array([steer + rng.normal(0, 0.1), gas, 0.0], dtype=np.float32)


async def run_env(nc, source, args, index):
    env = gym.make("CarRacing-v3", render_mode="rgb_array")
    rng = np.random.default_rng(index if args.seed is None else args.seed * 1000 + index)
    # Acks of up to 64 frames in flight; a frame whose ack does not come is
    # sent again with the same Nats-Msg-Id, so JetStream stores it once.
    publisher = wmvae.Publisher(source, connection=nc, max_pending=64)
    done_episodes = 0
    while args.episodes == 0 or done_episodes < args.episodes:
        tag = uuid.uuid4().hex[:8] if args.seed is None else f"s{args.seed}e{done_episodes}"
        episode = f"{source}-{tag}"
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        step, done = 0, False
        while not done:
            action = policy(obs, step, rng)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            done = bool(terminated or truncated) or step + 1 == args.max_steps
            await publisher.publish(episode, step, obs, action=action, reward=reward, done=done, wait=False)
            obs, step = next_obs, step + 1
            await asyncio.sleep(0)
        await publisher.flush()
        done_episodes += 1
        print(f"{source}: episode {episode} done after {step} steps", flush=True)
    await publisher.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats-url", help="default: WMVAE_NATS__URL, else nats://127.0.0.1:4222")
    p.add_argument("--envs", type=int, default=4, help="episodes run in parallel")
    p.add_argument("--episodes", type=int, default=0, help="per env; 0 = forever")
    p.add_argument("--max-steps", type=int, default=0, help="frames per episode at most; 0 = as the env ends it")
    p.add_argument("--seed", type=int, help="repeatable tracks and episode ids")
    args = p.parse_args()
    nc = await wmvae.connect(args.nats_url, reconnect=True)
    await asyncio.gather(*(run_env(nc, f"carracing-{i}", args, i) for i in range(args.envs)))
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
