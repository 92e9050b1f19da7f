"""The World Models ConvVAE in PyTorch, loadable from the daemon's weights.

Role: the model exactly as the daemon trains it (4 stride-2 convolutions
to a 32-dimensional latent, 4 stride-2 transposed convolutions back to
64x64x3; the paper's code), with the layer names of PyTorch's
``state_dict`` that the daemon's ``.safetensors`` use, so
``VAE.from_safetensors(bytes)`` (or ``load_state_dict``) reads them; and
NumPy in, NumPy out helpers for researchers: ``encode(frames)`` (uint8
frames, preprocessed as the daemon does) -> ``mu, logvar``, and
``decode(z)`` -> uint8 frames (rounded as the daemon's reconstructions).

It does not fetch weights (``wmvae.checkpoints.load_vae`` does), train
(the daemon does; ``scripts/torch_reference.py`` has the loss), or import
anything but torch, NumPy and PIL (through ``wmvae.preprocess``).
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .preprocess import preprocess

Z_SIZE = 32


class Encoder(nn.Module):
    def __init__(self, z_size=Z_SIZE):
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
    def __init__(self, z_size=Z_SIZE):
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
    """The ConvVAE. ``forward(x)`` (float NCHW in [0, 1]) samples
    ``z = mu + sigma * eps`` and returns ``(recon, mu, logvar)`` as in
    training; ``encode``/``decode`` are the NumPy-facing helpers.

    ``version`` and ``sha256`` say which checkpoint the weights came from
    (None for weights not fetched from the daemon)."""

    def __init__(self, z_size=Z_SIZE):
        super().__init__()
        self.z_size = z_size
        self.encoder = Encoder(z_size)
        self.decoder = Decoder(z_size)
        self.version = None
        self.sha256 = None

    def forward(self, x):
        mu, logvar = self.encoder(x)
        z = mu + torch.exp(logvar / 2) * torch.randn_like(mu)
        return self.decoder(z), mu, logvar

    @classmethod
    def from_safetensors(cls, data, version=None, sha256=None, device="cpu"):
        """A VAE in eval mode with the weights in `data` (safetensors bytes,
        or a file path). Loading is strict: every tensor, right shapes."""
        from safetensors.torch import load, load_file

        if isinstance(data, (bytes, bytearray, memoryview)):
            state = load(bytes(data))
        else:
            state = load_file(os.fspath(data))
        z_size = state["encoder.fc_mu.weight"].shape[0] if "encoder.fc_mu.weight" in state else Z_SIZE
        vae = cls(z_size)
        vae.load_state_dict(state, strict=True)
        vae.version, vae.sha256 = version, sha256
        return vae.to(device).eval()

    @property
    def device(self):
        return next(self.parameters()).device

    def frames_to_input(self, frames):
        """uint8 frames (N, H, W, 3) -> float (N, 3, 64, 64) in [0, 1] on
        this model's device, preprocessed as the daemon does."""
        frames = preprocess(frames)
        if frames.ndim == 3:
            frames = frames[None]
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        return x.permute(0, 3, 1, 2).float() / 255.0

    @torch.inference_mode()
    def encode(self, frames):
        """uint8 frames (N, H, W, 3) (64x64, or 96x96 CarRacing) -> float32
        ``mu, logvar`` (N, z) as NumPy; one frame (H, W, 3) -> (z,) each."""
        single = np.asarray(frames).ndim == 3
        mu, logvar = self.encoder(self.frames_to_input(frames))
        mu, logvar = mu.float().cpu().numpy(), logvar.float().cpu().numpy()
        return (mu[0], logvar[0]) if single else (mu, logvar)

    @torch.inference_mode()
    def decode(self, z):
        """Latents (N, z) (or one (z,)) -> uint8 frames (N, 64, 64, 3)
        (or one (64, 64, 3)): ``round(255 * decoder(z))``, as the daemon."""
        z = np.asarray(z, dtype=np.float32)
        single = z.ndim == 1
        zt = torch.from_numpy(np.ascontiguousarray(z.reshape(-1, self.z_size))).to(self.device)
        recon = self.decoder(zt)
        frames = (recon * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return frames[0] if single else frames
