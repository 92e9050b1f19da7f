"""The wire contract's messages (PROTOCOL.md), built and read in Python.

Role: the frame message a publisher sends (MessagePack map), the
``Nats-Msg-Id`` that makes its retries store once, the checks that refuse
a bad source, episode, step or transition before anything is sent, and the
latent message read back as a dict of NumPy arrays.

Message ids: ``<source>/<episode>/<step>`` with source and episode
percent-escaped: every byte of their UTF-8 outside printable ASCII
(0x21..0x7E), and ``%`` and ``/``, is written ``%XX`` (uppercase hex), so
no identity can forge another's id (``a/b`` + ``c`` vs ``a`` + ``b/c``).

It does not talk to NATS (``wmvae.publisher``, ``wmvae.latents`` do), nor
preprocess pixels (the daemon does; ``wmvae.preprocess`` mirrors it).
"""
import math
import unicodedata

import msgpack
import numpy as np

#: Longest episode name the daemon accepts, in bytes of UTF-8.
MAX_EPISODE_BYTES = 256
#: Longest source the daemon accepts, in bytes of UTF-8.
MAX_SOURCE_BYTES = 256
#: Largest step the daemon accepts (bad_step past 2^53 - 1).
MAX_STEP = (1 << 53) - 1
#: Most action values a frame may carry.
MAX_ACTION = 64
#: Largest side of a frame.
MAX_SIDE = 1024


def escape_id_part(text):
    """Percent-escapes a source or episode for a Nats-Msg-Id."""
    out = []
    for byte in text.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x25, 0x2F):  # '%', '/'
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def check_source(source):
    """A source must be one NATS subject token of at most 256 bytes:
    non-empty, no whitespace or control characters, no '.', '*' or '>'.
    Raises ValueError."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a non-empty string, not {source!r}")
    if len(source.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise ValueError(f"source is over {MAX_SOURCE_BYTES} bytes")
    for ch in source:
        if ch in ".*>" or ch.isspace() or unicodedata.category(ch) == "Cc":
            raise ValueError(f"source {source!r} is not a NATS subject token (no whitespace, '.', '*', '>')")
    return source


def check_episode(episode):
    """An episode: a non-empty string of at most 256 bytes of UTF-8 without
    control characters. Raises ValueError."""
    if not isinstance(episode, str) or not episode:
        raise ValueError(f"episode must be a non-empty string, not {episode!r}")
    if any(unicodedata.category(ch) == "Cc" for ch in episode):
        raise ValueError(f"episode {episode!r} holds control characters")
    if len(episode.encode("utf-8")) > MAX_EPISODE_BYTES:
        raise ValueError(f"episode is over {MAX_EPISODE_BYTES} bytes")
    return episode


def check_step(step):
    """A step: an integer in 0..=2^53-1. Raises ValueError."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an integer, not {step!r}")
    step = int(step)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} out of 0..=2^53-1")
    return step


def msg_id(source, episode, step):
    """The Nats-Msg-Id of a frame: ``<source>/<episode>/<step>``, escaped."""
    check_source(source)
    check_episode(episode)
    return f"{escape_id_part(source)}/{escape_id_part(episode)}/{check_step(step)}"


def frame_message(episode, step, pixels, action=None, reward=None, done=None):
    """The frame message (a dict) for uint8 RGB `pixels` (H, W, 3), sent
    raw; `action` (floats), `reward` (float) and `done` (bool) optional.
    Everything the daemon would dead-letter is refused with ValueError."""
    check_episode(episode)
    step = check_step(step)
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3), not {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ValueError(f"frame size {height}x{width} out of 1..=1024")
    message = {"episode": episode, "step": step, "height": int(height), "width": int(width), "channels": 3,
               "pixels": np.ascontiguousarray(pixels).tobytes()}
    if action is not None:
        values = [float(a) for a in np.asarray(action, dtype=np.float64).ravel()]
        if len(values) > MAX_ACTION or not all(math.isfinite(a) for a in values):
            raise ValueError(f"action must be at most {MAX_ACTION} finite numbers")
        message["action"] = values
    if reward is not None:
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, not {reward}")
        message["reward"] = reward
    if done is not None:
        message["done"] = bool(done)
    return message


def pack(message):
    """MessagePack bytes of a message."""
    return msgpack.packb(message, use_bin_type=True)


def decode_latent(data, subject=None, prefix="wm"):
    """A latent message (PROTOCOL.md, "Latents out") as a dict: ``source``
    (from the subject, when given), ``episode``, ``step``,
    ``model_version``, ``mu`` and ``logvar`` (float32 (32,)), ``action``
    (float32 array or None), ``reward`` (float or None), ``done`` (bool or
    None)."""
    latent = msgpack.unpackb(data, raw=False)
    out = {
        "source": None,
        "episode": latent["episode"],
        "step": int(latent["step"]),
        "model_version": int(latent["model_version"]),
        "mu": np.asarray(latent["mu"], dtype=np.float32),
        "logvar": np.asarray(latent["logvar"], dtype=np.float32),
        "action": None if latent.get("action") is None else np.asarray(latent["action"], dtype=np.float32),
        "reward": None if latent.get("reward") is None else float(latent["reward"]),
        "done": None if latent.get("done") is None else bool(latent["done"]),
    }
    if subject is not None:
        head = f"{prefix}.latents."
        out["source"] = subject[len(head):] if subject.startswith(head) else subject
    return out
