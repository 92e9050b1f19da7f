#!/usr/bin/env python3
"""Train World Models' memory model (M), the MDN-RNN, on wmvae's series.

The paper's model and settings (Ha & Schmidhuber 2018; its carracing
rnn.py): an LSTM of 256 units reads z_t concatenated with the action a_t
and outputs, for each of the 32 dimensions of z_{t+1}, a mixture of 5
Gaussians (log mixing weights, means, log standard deviations); the loss
is the mixture's negative log-likelihood of z_{t+1}, averaged over
dimensions and steps. Each batch samples z = mu + exp(logvar / 2) * eps
from the series' mu and logvar, as the paper does (--z mu uses mu alone).
Adam, learning rate 1e-3, gradients clipped to [-1, 1], batch 100. The
paper trains on sequences of 1000 steps; --seq-len (default 100) takes
random windows that long (shorter episodes are skipped).

    .venv/bin/python examples/train_mdn_rnn.py --series DIR --steps N
        [--seq-len 100] [--batch-size 100] [--lr 1e-3] [--z sample|mu]
        [--seed 0] [--log-every 1] [--save M.safetensors] [--threads T]

DIR is a series directory (`wmvae series ...` writes one: index.json and
an .npz per episode), read with wmvae.read_series. Prints
`step S loss L` lines. Missing actions (NaN) count as 0.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn

try:
    import wmvae
except ImportError:  # run from a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import wmvae

LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)


class MDNRNN(nn.Module):
    """LSTM(256) -> per z dimension a mixture of `mixtures` Gaussians."""

    def __init__(self, z_size=32, action_size=3, hidden=256, mixtures=5):
        super().__init__()
        self.z_size, self.mixtures = z_size, mixtures
        self.lstm = nn.LSTM(z_size + action_size, hidden, batch_first=True)
        self.mdn = nn.Linear(hidden, z_size * mixtures * 3)

    def forward(self, z, action, state=None):
        """(B, T, z), (B, T, A) -> log mixing weights, means, log std
        devs, each (B, T, z, mixtures), and the LSTM state."""
        out, state = self.lstm(torch.cat([z, action], dim=-1), state)
        params = self.mdn(out).view(*out.shape[:2], self.z_size, self.mixtures * 3)
        logmix, mean, logstd = params.split(self.mixtures, dim=-1)
        return torch.log_softmax(logmix, dim=-1), mean, logstd, state


def mdn_loss(logmix, mean, logstd, target):
    """The mixture's negative log-likelihood of `target` (B, T, z), averaged
    (the paper's lossfunc)."""
    y = target.unsqueeze(-1)
    lognormal = -0.5 * ((y - mean) / logstd.exp()) ** 2 - logstd - LOG_SQRT_2PI
    return -torch.logsumexp(logmix + lognormal, dim=-1).mean()


def load_episodes(directory, seq_len):
    episodes = list(wmvae.read_series(directory))
    if not episodes:
        sys.exit(f"{directory}: no episodes in its index.json")
    usable = [e for e in episodes if len(e["mu"]) >= seq_len + 1]
    if not usable:
        longest = max(len(e["mu"]) for e in episodes)
        sys.exit(f"{directory}: no episode has {seq_len + 1} steps (the longest has {longest}); lower --seq-len")
    widths = {e["action"].shape[1] for e in usable}
    if len(widths) != 1:
        sys.exit(f"{directory}: episodes have actions of different widths {sorted(widths)}")
    for e in usable:
        e["action"] = np.nan_to_num(e["action"], nan=0.0)
    return usable


def batch(episodes, batch_size, seq_len, rng, sample_z):
    """Random windows of seq_len + 1 steps: inputs (z_t, a_t), targets z_{t+1}."""
    zs, actions = [], []
    for i in rng.integers(len(episodes), size=batch_size):
        e = episodes[i]
        start = rng.integers(len(e["mu"]) - seq_len)
        window = slice(start, start + seq_len + 1)
        mu, logvar = e["mu"][window], e["logvar"][window]
        zs.append(mu + np.exp(logvar / 2) * rng.standard_normal(mu.shape).astype(np.float32) if sample_z else mu)
        actions.append(e["action"][window])
    z = torch.from_numpy(np.stack(zs).astype(np.float32))
    action = torch.from_numpy(np.stack(actions).astype(np.float32))
    return z[:, :-1], action[:, :-1], z[:, 1:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", required=True, help="series directory (index.json + .npz files)")
    p.add_argument("--steps", type=int, required=True, help="training steps")
    p.add_argument("--seq-len", type=int, default=100, help="steps per training sequence (paper: 1000)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradients clipped to [-c, c]")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--mixtures", type=int, default=5)
    p.add_argument("--z", choices=["sample", "mu"], default="sample", help="z from mu and logvar (paper) or mu alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1, help="print a loss line every this many steps")
    p.add_argument("--save", help="write the trained weights here (.safetensors)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    episodes = load_episodes(args.series, args.seq_len)
    z_size, action_size = episodes[0]["mu"].shape[1], episodes[0]["action"].shape[1]
    print(f"{len(episodes)} episodes, {sum(len(e['mu']) for e in episodes)} steps, z {z_size}, action {action_size}, "
          f"versions {sorted({e['version'] for e in episodes})}", flush=True)
    model = MDNRNN(z_size, action_size, args.hidden, args.mixtures)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        z, action, target = batch(episodes, args.batch_size, args.seq_len, rng, args.z == "sample")
        logmix, mean, logstd, _ = model(z, action)
        loss = mdn_loss(logmix, mean, logstd, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), args.grad_clip)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
    if args.save:
        from safetensors.torch import save_file

        save_file(model.state_dict(), args.save)
        print(f"weights written to {args.save}")


if __name__ == "__main__":
    main()
