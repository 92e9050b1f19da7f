#!/usr/bin/env python3
"""The World Models VAE in plain PyTorch, as a reference for wmvae.

Same layer names as wmvae's safetensors files (PyTorch state_dict layout), so
`VAE().load_state_dict(safetensors.torch.load_file(path))` loads our weights.

Subcommands (run with the project's .venv/bin/python):
  parity --weights W.safetensors --frames F.npy --out O.npz
      mu, logvar and the reconstruction decode(mu) of 64x64 uint8 frames.
  decode --weights W.safetensors --latents Z.npz [--key z] --out O.npz
      decoder(z): `floats` (N, 64, 64, 3) in [0, 1] and `frames` uint8.
  save-weights --out W.safetensors [--seed S]
      freshly initialised PyTorch weights (to check that wmvae loads them).
  resize --frames F.npy --out O.npy
      96x96 frames through the World Models preprocessing with PIL:
      crop rows 0..84, Image.resize((64, 64), Image.BILINEAR).
  adam --weights W.safetensors --grads G.safetensors --steps N --lr LR --out O.safetensors
      N steps of torch.optim.Adam from weights W, the gradient of step k
      being G's tensor of the same name times (-1)^k (k + 1).
  bench [--batch 100] [--steps 20] [--threads T] [--channels-last] [--device cpu|cuda]
      training images/s of PyTorch eager (forward, loss, backward, Adam),
      printed as one JSON object.
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Encoder(nn.Module):
    def __init__(self, z_size=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 4, stride=2)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2)
        self.conv3 = nn.Conv2d(64, 128, 4, stride=2)
        self.conv4 = nn.Conv2d(128, 256, 4, stride=2)
        self.fc_mu = nn.Linear(1024, z_size)
        self.fc_logvar = nn.Linear(1024, z_size)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = x.flatten(1)
        return self.fc_mu(x), self.fc_logvar(x)


class Decoder(nn.Module):
    def __init__(self, z_size=32):
        super().__init__()
        self.fc = nn.Linear(z_size, 1024)
        self.deconv1 = nn.ConvTranspose2d(1024, 128, 5, stride=2)
        self.deconv2 = nn.ConvTranspose2d(128, 64, 5, stride=2)
        self.deconv3 = nn.ConvTranspose2d(64, 32, 6, stride=2)
        self.deconv4 = nn.ConvTranspose2d(32, 3, 6, stride=2)

    def forward(self, z):
        x = self.fc(z).view(-1, 1024, 1, 1)
        x = F.relu(self.deconv1(x))
        x = F.relu(self.deconv2(x))
        x = F.relu(self.deconv3(x))
        return torch.sigmoid(self.deconv4(x))


class VAE(nn.Module):
    def __init__(self, z_size=32):
        super().__init__()
        self.encoder = Encoder(z_size)
        self.decoder = Decoder(z_size)

    def forward(self, x):
        mu, logvar = self.encoder(x)
        z = mu + torch.exp(logvar / 2) * torch.randn_like(mu)
        return self.decoder(z), mu, logvar


def loss(recon, x, mu, logvar, kl_tolerance=0.5):
    r = (recon - x).pow(2).sum(dim=(1, 2, 3)).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    kl = torch.clamp(kl, min=kl_tolerance * mu.shape[1]).mean()
    return r + kl


def frames_to_input(frames):
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


def cmd_parity(args):
    from safetensors.torch import load_file

    vae = VAE()
    vae.load_state_dict(load_file(args.weights))
    vae.eval()
    x = frames_to_input(np.load(args.frames))
    with torch.no_grad():
        mu, logvar = vae.encoder(x)
        recon = vae.decoder(mu)
    np.savez(args.out, mu=mu.numpy(), logvar=logvar.numpy(), recon=recon.numpy())


def cmd_decode(args):
    from safetensors.torch import load_file

    vae = VAE()
    vae.load_state_dict(load_file(args.weights))
    vae.eval()
    z = torch.from_numpy(np.load(args.latents)[args.key])
    with torch.no_grad():
        floats = vae.decoder(z).permute(0, 2, 3, 1).contiguous().numpy()
    frames = np.clip(np.round(floats * 255.0), 0, 255).astype(np.uint8)
    np.savez(args.out, floats=floats, frames=frames)


def cmd_save_weights(args):
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    save_file(VAE().state_dict(), args.out)


def cmd_resize(args):
    from PIL import Image

    frames = np.load(args.frames)
    out = [np.asarray(Image.fromarray(f[:84]).resize((64, 64), Image.BILINEAR)) for f in frames]
    np.save(args.out, np.stack(out).astype(np.uint8))


def cmd_adam(args):
    from safetensors.torch import load_file, save_file

    vae = VAE()
    vae.load_state_dict(load_file(args.weights))
    grads = load_file(args.grads)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    for k in range(args.steps):
        for name, p in vae.named_parameters():
            p.grad = grads[name] * ((-1) ** k * (k + 1))
        opt.step()
    save_file(vae.state_dict(), args.out)


def cmd_bench(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = VAE().to(args.device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 64, 64, 3), dtype=torch.uint8, generator=g)
    x = (x.permute(0, 3, 1, 2).float() / 255.0).to(args.device)
    if args.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()

    def step():
        opt.zero_grad()
        recon, mu, logvar = vae(x)
        l = loss(recon, x, mu, logvar)
        l.backward()
        opt.step()
        return l.item()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    rate = args.batch * args.steps / (time.perf_counter() - start)
    print(json.dumps({
        "bench": "train-pytorch",
        "torch": torch.__version__,
        "device": args.device,
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        "train_images_per_s": rate,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("parity")
    s.add_argument("--weights", required=True)
    s.add_argument("--frames", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("decode")
    s.add_argument("--weights", required=True)
    s.add_argument("--latents", required=True)
    s.add_argument("--key", default="z")
    s.add_argument("--out", required=True)
    s = sub.add_parser("save-weights")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("resize")
    s.add_argument("--frames", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("adam")
    s.add_argument("--weights", required=True)
    s.add_argument("--grads", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--lr", type=float, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("bench")
    s.add_argument("--batch", type=int, default=100)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--device", default="cpu")
    args = p.parse_args()
    {"parity": cmd_parity, "decode": cmd_decode, "save-weights": cmd_save_weights, "resize": cmd_resize, "adam": cmd_adam, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    main()
