"""The daemon's checkpoints, from NATS: the active version, weights, decode.

Role:

- ``active_version()``: KV bucket ``wm-meta``, key ``active`` (JSON
  ``{"version", "sha256", "epoch"}``), the version every encoder uses (a
  user not allowed to read that bucket gets the announcements' view: the
  newest ``created`` or the last rollback's ``to``).
- ``fetch_weights(js, version, sha256)``: object ``vae/v{version}.safetensors``
  from the object store bucket ``wm-checkpoints``, its SHA-256 checked.
- ``load_vae(version="active")``: those weights in a ``wmvae.model.VAE``
  (a ``torch.nn.Module``) with ``.version`` and ``.sha256``. For "active"
  the bytes are checked against the sha256 in ``wm-meta``; for a pinned
  version against the ``sha256`` of that version's last announcement on
  ``wm.checkpoints`` (stream WM_CHECKPOINTS: its ``created`` event, or a
  rollback to it), and, where the stream no longer holds one, only against
  the object store's own SHA-256 digest (which nats-py checks on every
  read). A mismatch raises ``ChecksumError``; nothing is loaded.
- ``decode(z, version=None)``: the daemon's ``wm.ctl.decode`` endpoint:
  latents to uint8 64x64 RGB frames on the daemon's model, without torch
  here.

Sync functions run on a private background event loop (so they work in
notebooks whose own loop is running); each has an ``..._async`` twin. It
does not cache weights, follow version changes (``LatentObservation``
does), or change anything on the daemon.
"""
import asyncio
import hashlib
import json
import time

import msgpack
import nats.errors
import nats.js.errors
import numpy as np

from . import _loop
from . import connection as _connection

META_BUCKET = "wm-meta"
ACTIVE_KEY = "active"
OBJECT_BUCKET = "wm-checkpoints"
ANNOUNCEMENTS = "WM_CHECKPOINTS"
SIDE = 64
#: Latents per wm.ctl.decode request, at most.
DECODE_BATCH = 256


class ChecksumError(Exception):
    """Fetched weights whose SHA-256 is not the announced one."""


class DaemonError(Exception):
    """A service error from the daemon (``Nats-Service-Error``), with its code."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def object_name(version):
    return f"vae/v{int(version)}.safetensors"


async def active_version(js, prefix=None):
    """The active version as ``{"version", "sha256", "epoch", "revision"}``,
    or None while there is none (no bucket or no key yet).

    Where KV ``wm-meta`` cannot be read (a user without the permission: an
    older config/nats-permissions.conf), the active version is taken from
    the announcements instead (the last ``created``, or a rollback's
    ``to``), with ``"epoch": None``."""
    try:
        kv = await js.key_value(META_BUCKET)
        entry = await kv.get(ACTIVE_KEY)
    except nats.js.errors.NotFoundError:  # no bucket, no key, deleted
        return None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, asyncio.TimeoutError):
        return await active_from_announcements(js, prefix)
    if entry is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None
    active = json.loads(entry.value)
    active["version"] = int(active["version"])
    active["revision"] = entry.revision
    return active


async def wait_for_active(js, timeout=60.0, prefix=None):
    """``active_version``, waiting up to `timeout` s for a first version
    (a daemon's trainer makes version 1 as it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        active = await active_version(js, prefix)
        if active is not None:
            return active
        if time.monotonic() >= deadline:
            raise LookupError(f"no active version in KV {META_BUCKET}/{ACTIVE_KEY} after {timeout} s: is a trainer running?")
        await asyncio.sleep(0.25)


async def announcements(js, prefix=None):
    """Every checkpoint announcement WM_CHECKPOINTS holds, oldest first
    (MessagePack maps decoded to dicts)."""
    prefix = prefix or _connection.subject_prefix()
    sub = await js.subscribe(f"{prefix}.checkpoints", stream=ANNOUNCEMENTS, ordered_consumer=True)
    events = []
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and not info.delivered.stream_seq:  # nothing pending, nothing delivered
            return events
        async for msg in sub.messages:
            events.append(msgpack.unpackb(msg.data, raw=False))
            if msg.metadata.num_pending == 0:
                break
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass
    return events


async def announcement(js, version, prefix=None):
    """The last ``created`` or ``rollback`` announcement that carries
    `version`'s metadata (its ``sha256``); None if the stream holds none.
    LookupError if the version's last event is ``deleted``."""
    found = None
    for event in await announcements(js, prefix):
        if event.get("version") == version:
            if event.get("event") in ("created", "rollback") and event.get("sha256"):
                found = event
            elif event.get("event") == "deleted":
                found = "deleted"
    if found == "deleted":
        raise LookupError(f"version {version} was deleted")
    return found


async def active_from_announcements(js, prefix=None):
    """The active version as the announcements tell it: the newest
    ``created``, or the ``to`` of a later rollback; None if none."""
    active, hashes = None, {}
    for event in await announcements(js, prefix):
        if event.get("sha256") and event.get("version") is not None:
            hashes[event["version"]] = event["sha256"]
        if event.get("event") == "created":
            active = event["version"]
        elif event.get("event") == "rollback":
            active = event.get("to", event.get("version"))
    if active is None:
        return None
    return {"version": int(active), "sha256": hashes.get(active), "epoch": None, "revision": None}


async def fetch_weights(js, version, sha256=None):
    """The safetensors bytes of `version` and their hex SHA-256; with
    `sha256`, ChecksumError unless they match it."""
    try:
        store = await js.object_store(OBJECT_BUCKET)
        obj = await store.get(object_name(version))
    except nats.js.errors.ObjectNotFoundError:
        raise LookupError(f"no object {object_name(version)} in bucket {OBJECT_BUCKET}") from None
    except nats.js.errors.DigestMismatchError:
        raise ChecksumError(f"{object_name(version)}: its bytes do not match the object store's digest") from None
    data = bytes(obj.data)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise ChecksumError(f"{object_name(version)}: sha256 {digest}, announced {sha256}")
    return data, digest


async def resolve(js, version="active", timeout=60.0, prefix=None):
    """(version, expected sha256 or None) for "active" or a pinned int."""
    if version == "active":
        active = await wait_for_active(js, timeout, prefix)
        return active["version"], active["sha256"]
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be 'active' or a version number >= 1, not {version!r}")
    version = int(version)
    event = await announcement(js, version, prefix)
    return version, (event["sha256"] if event else None)


async def load_vae_async(version="active", nats_url=None, *, connection=None, device="cpu", timeout=60.0):
    """``load_vae`` for asyncio code."""
    from .model import VAE

    nc = connection or await _connection.connect(nats_url)
    try:
        js = nc.jetstream()
        number, expected = await resolve(js, version, timeout)
        data, digest = await fetch_weights(js, number, expected)
    finally:
        if connection is None:
            await nc.close()
    return VAE.from_safetensors(data, version=number, sha256=digest, device=device)


def load_vae(version="active", nats_url=None, *, device="cpu", timeout=60.0):
    """The VAE of `version` ("active", or a version number) as a
    ``torch.nn.Module`` in eval mode, weights fetched from the object store
    and SHA-256 checked (see the module's doc). ``.encode(frames)`` and
    ``.decode(z)`` use it from NumPy; ``.version``, ``.sha256`` say which.
    For "active", waits up to `timeout` s for a first version."""
    return _loop.shared().run(load_vae_async(version, nats_url, device=device, timeout=timeout))


async def decode_async(z, version=None, nats_url=None, *, connection=None, timeout=30.0, prefix=None):
    """``decode`` for asyncio code."""
    z = np.asarray(z, dtype=np.float32)
    single = z.ndim == 1
    z = z.reshape(1, -1) if single else z
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be (N, z_size) with N >= 1, not {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z must be finite")
    prefix = prefix or _connection.subject_prefix()
    nc = connection or await _connection.connect(nats_url)
    frames = []
    # A reply must fit the server's max_payload (1 MB by default: 85 frames).
    batch = max(1, min(DECODE_BATCH, (nc.max_payload - 4096) // (SIDE * SIDE * 3)))
    try:
        for start in range(0, len(z), batch):
            chunk = z[start:start + batch]
            request = {"z": chunk.tolist()}
            if version is not None:
                request["version"] = int(version)
            reply = await nc.request(f"{prefix}.ctl.decode", msgpack.packb(request), timeout=timeout)
            headers = reply.headers or {}
            if headers.get("Nats-Service-Error"):
                raise DaemonError(headers.get("Nats-Service-Error-Code", "?"), headers["Nats-Service-Error"])
            answer = msgpack.unpackb(reply.data, raw=False)
            # Every chunk from the version the first one used.
            version = int(answer["version"])
            pixels = np.frombuffer(answer["frames"], dtype=np.uint8)
            if pixels.size != len(chunk) * SIDE * SIDE * 3:
                raise DaemonError("500", f"decode replied {pixels.size} bytes for {len(chunk)} latents")
            frames.append(pixels.reshape(len(chunk), SIDE, SIDE, 3))
    finally:
        if connection is None:
            await nc.close()
    out = np.concatenate(frames)
    return out[0] if single else out


def decode(z, version=None, nats_url=None, *, timeout=30.0):
    """Latents (N, 32) (or one (32,)) -> uint8 frames (N, 64, 64, 3) (or
    one (64, 64, 3)), decoded by the daemon (``wm.ctl.decode``) with the
    active version or `version`. Requests carry at most 256 latents, and no
    more than a reply within the server's ``max_payload`` holds (85 at
    NATS's default 1 MB); several requests all use the version the first
    one did. Raises
    ``nats.errors.NoRespondersError`` when no daemon serves it,
    ``DaemonError`` for its refusals (404: unknown version)."""
    return _loop.shared().run(decode_async(z, version, nats_url, timeout=timeout))
