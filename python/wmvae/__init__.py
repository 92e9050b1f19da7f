"""wmvae: use the wmvae daemon from Python (a notebook, a rollout worker).

    import wmvae

    async with wmvae.Publisher("worker-1") as pub:        # frames in
        await pub.publish("ep-1", 0, obs, action=a, reward=r, done=d)
    async for latent in wmvae.latents("worker-1"):       # latents out
        ...
    episodes = list(wmvae.read_series("series/"))         # M's training data
    vae = wmvae.load_vae()                                # active version, sha256 checked
    mu, logvar = vae.encode(frames); pictures = vae.decode(mu)
    pictures = wmvae.decode(z)                            # decoded by the daemon
    env = wmvae.LatentObservation(gymnasium.make("CarRacing-v3"), publish=True)

Modules, one concern each: ``connection`` (WMVAE_NATS__* settings),
``messages`` (the wire contract, message ids), ``preprocess`` (the daemon's
64x64 preprocessing), ``publisher``, ``latents``, ``series``, ``model``
(the ConvVAE in torch), ``checkpoints`` (active version, weights, decode),
``gym_wrapper`` (LatentObservation).

Needs nats-py, msgpack, NumPy and Pillow; ``load_vae``, ``VAE`` need torch
and safetensors (extra ``[torch]``); ``LatentObservation`` needs gymnasium
too (extra ``[gym]``). Those are imported only when first used, so
``import wmvae`` works without them. The package does not run or configure
the daemon.
"""
from .checkpoints import ChecksumError, DaemonError, decode, load_vae
from .connection import connect
from .latents import latents
from .messages import msg_id
from .publisher import Publisher, SyncPublisher
from .series import SeriesError, read_series, write_episode, write_index

__version__ = "0.1.0"

__all__ = [
    "Publisher", "SyncPublisher", "latents", "read_series", "write_episode", "write_index", "load_vae", "decode",
    "LatentObservation", "VAE", "connect", "msg_id", "ChecksumError", "DaemonError", "SeriesError",
]


def __getattr__(name):
    # torch and gymnasium are optional: imported on first use only.
    if name == "LatentObservation":
        from .gym_wrapper import LatentObservation
        return LatentObservation
    if name == "VAE":
        from .model import VAE
        return VAE
    raise AttributeError(f"module 'wmvae' has no attribute {name!r}")
