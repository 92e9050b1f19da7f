"""The daemon's frame preprocessing, in NumPy and PIL.

Role: turn camera frames into the VAE's 64x64 RGB input exactly as
``wmvae serve`` and ``wmvae encode`` do (PROTOCOL.md, "Preprocessing"):
64x64 frames as they are; 96x96 frames (CarRacing) cropped to rows 0..84
and resized to 64x64 with PIL's ``Image.resize((64, 64), Image.BILINEAR)``,
which the daemon reproduces bit for bit. Other sizes are refused, as the
daemon dead-letters them under ``[ingest] preprocess = "world_models"``.

It does not scale to floats or touch tensors (``wmvae.model`` does), and it
does not implement the daemon's optional ``preprocess = "resize"`` mode.
"""
import numpy as np
from PIL import Image

SIDE = 64
CHANNELS = 3
CARRACING_SIDE = 96
CROP_ROWS = 84


def preprocess_frame(frame):
    """One uint8 frame (H, W, 3) -> uint8 (64, 64, 3)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, not {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != CHANNELS:
        raise ValueError(f"a frame must be (H, W, 3), not {frame.shape}")
    if frame.shape[:2] == (SIDE, SIDE):
        return np.ascontiguousarray(frame)
    if frame.shape[:2] == (CARRACING_SIDE, CARRACING_SIDE):
        cropped = np.ascontiguousarray(frame[:CROP_ROWS])
        return np.array(Image.fromarray(cropped).resize((SIDE, SIDE), Image.BILINEAR))
    raise ValueError(f"unsupported frame size {frame.shape[0]}x{frame.shape[1]}: 64x64 or 96x96 only")


def preprocess(frames):
    """uint8 frames (N, H, W, 3), or one (H, W, 3), -> uint8 (N, 64, 64, 3)
    (or (64, 64, 3) for one frame)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        return preprocess_frame(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, 3) or (H, W, 3), not {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, not {frames.dtype}")
    if frames.shape[3] != CHANNELS:
        raise ValueError(f"frames must be (N, H, W, 3), not {frames.shape}")
    if frames.shape[1:3] == (SIDE, SIDE):
        return np.ascontiguousarray(frames)
    out = np.empty((len(frames), SIDE, SIDE, CHANNELS), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = preprocess_frame(frame)
    return out
