"""A gymnasium wrapper whose observations are the VAE's latents.

Role: ``LatentObservation(env)`` turns an environment's pixel observations
(uint8 96x96x3 CarRacing frames, or 64x64x3) into ``z`` = the VAE's ``mu``
(float32, shape (32,)), preprocessed as the daemon does, computed by a
local copy of the model (CPU by default, batch 1). With
``version="active"`` it follows KV ``wm-meta``/``active`` in the background
and swaps in each newly active version (fetched and SHA-256 checked beside
the old one, then swapped under a lock between two steps); with a pinned
version number it keeps that one. With ``publish=True`` it also publishes
every raw frame the agent acted on to ``<prefix>.frames.<source>``, with the
action taken, the reward and ``done`` (terminated or truncated) that
``step`` returned, one episode id (a UUID) per ``reset``: acting collects
the daemon's training data. Publishes are asynchronous (at most
``max_pending`` unacknowledged; ``step`` waits when that many are in
flight), retried through elections; a publish that finally fails is raised
by the next ``step`` (or ``close``).

It does not sample ``z`` (it returns ``mu``), stack frames, or publish the
last observation of an episode (no action was taken on it). Call
``close()`` to wait for the last acks and stop its background thread.
"""
import asyncio
import copy
import json
import logging
import os
import threading
import uuid

import gymnasium
import numpy as np
import torch
from gymnasium.spaces import Box

from . import _loop, checkpoints, messages
from . import connection as _connection
from .publisher import Publisher

log = logging.getLogger(__name__)


def _inference_encoder(model):
    """A copy of `model`'s encoder in channels-last memory format: at batch 1
    on a CPU about twice as fast as the default layout's convolutions, with
    the same results (the model's own weights stay as they are, so its
    state_dict still saves)."""
    return copy.deepcopy(model.encoder).to(memory_format=torch.channels_last).eval()


class LatentObservation(gymnasium.ObservationWrapper):
    """Observations become the VAE's latent ``mu`` (float32, (32,)).

        env = LatentObservation(gymnasium.make("CarRacing-v3"), publish=True)
        z, info = env.reset(seed=0)
        z, reward, terminated, truncated, info = env.step(env.action_space.sample())

    `nats_url` (comma-separated servers) overrides WMVAE_NATS__URL,
    credentials from WMVAE_NATS__*; `version`: "active" (followed) or a
    version number (kept); `source` names the publisher (default
    ``gym-<pid>``); `model` uses a ``wmvae.model.VAE`` you already hold
    instead of fetching one and following versions (then NATS is needed
    only to publish; the wrapper encodes with a copy of its encoder, taken
    here). `torch_threads` (default 1) is passed to
    ``torch.set_num_threads``, which is process-wide: batch-1 encoding is
    fastest on one thread and many times slower with two where the cores
    are shared; ``torch_threads=None`` leaves torch's setting alone.
    """

    def __init__(self, env, nats_url=None, version="active", publish=False, *, source=None, model=None,
                 device="cpu", timeout=60.0, max_pending=256, torch_threads=1):
        super().__init__(env)
        if torch_threads:
            # Process-wide (torch has no per-model setting): batch-1 inference
            # gains nothing from more threads, and where the cores are shared
            # (a simulator, other workers) 2 threads cost 10-50x the latency.
            torch.set_num_threads(int(torch_threads))
        shape = getattr(env.observation_space, "shape", None)
        if shape not in ((96, 96, 3), (64, 64, 3)):
            raise ValueError(f"LatentObservation needs 96x96x3 or 64x64x3 pixel observations, not {shape}")
        self.nats_url = nats_url
        self.version = version
        self.source = messages.check_source(source or f"gym-{os.getpid()}")
        self.episode = None
        self.swaps = 0
        self._step = 0
        self._last_raw = None
        self._lock = threading.Lock()
        self._window = threading.BoundedSemaphore(max(1, int(max_pending)))
        self._in_flight = set()
        self._flight_lock = threading.Lock()
        self._failure = None
        self._closed = False
        self._loop = None
        self._nc = None
        self._watcher = None
        self._publisher = None
        try:
            if model is None or publish:
                self._loop = _loop.BackgroundLoop("wmvae-latent-observation")
                self._nc = self._loop.run(_connection.connect(nats_url, reconnect=True))
            fetched = model is None
            if fetched:
                self._device = device
                model = self._loop.run(checkpoints.load_vae_async(version, connection=self._nc, device=device,
                                                                  timeout=timeout))
            else:
                self._device = model.device
            self._model, self._encoder = model.eval(), _inference_encoder(model)
            if fetched and version == "active":
                self._watcher = self._loop.submit(self._follow_active())
            if publish:
                self._publisher = Publisher(self.source, connection=self._nc)
                self._loop.run(self._publisher.connect())
        except BaseException:
            self._shutdown(flush=False)
            raise
        z_size = getattr(self._model, "z_size", 32)
        self.observation_space = Box(-np.inf, np.inf, (z_size,), np.float32)

    # -- the model -------------------------------------------------------

    @property
    def model(self):
        """The VAE the next observation will use."""
        with self._lock:
            return self._model

    @property
    def model_version(self):
        return self.model.version

    def observation(self, observation):
        with self._lock:
            model, encoder = self._model, self._encoder
        x = model.frames_to_input(observation).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            mu, _ = encoder(x)
        return mu[0].float().cpu().numpy()

    async def _follow_active(self):
        """Swaps in each version KV wm-meta/active moves to."""
        js = self._nc.jetstream()
        pause = 1.0
        while True:
            watcher = None
            try:
                kv = await js.key_value(checkpoints.META_BUCKET)
                watcher = await kv.watch(checkpoints.ACTIVE_KEY)
                async for entry in watcher:
                    if entry is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
                        continue
                    active = json.loads(entry.value)
                    if int(active["version"]) != self.model_version:
                        await self._swap(int(active["version"]), active["sha256"])
                    pause = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a fetch that failed, no permission, the bucket gone: try again
                log.warning("following the active version: %r; again in %.0f s", error, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 60.0)
            finally:
                if watcher is not None:
                    try:
                        await watcher.stop()
                    except Exception:
                        pass

    async def _swap(self, version, sha256):
        from .model import VAE

        data, digest = await checkpoints.fetch_weights(self._nc.jetstream(), version, sha256)

        def build():
            new = VAE.from_safetensors(data, version=version, sha256=digest, device=self._device)
            return new, _inference_encoder(new)

        new, encoder = await asyncio.get_running_loop().run_in_executor(None, build)
        with self._lock:
            self._model, self._encoder = new, encoder
            self.swaps += 1
        log.info("LatentObservation: now version %s", version)

    # -- stepping and publishing -----------------------------------------

    def reset(self, *, seed=None, options=None):
        self._raise_failure()
        obs, info = self.env.reset(seed=seed, options=options)
        self.episode = uuid.uuid4().hex
        self._step = 0
        self._last_raw = obs
        return self.observation(obs), info

    def step(self, action):
        self._raise_failure()
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._publisher is not None and self._last_raw is not None:
            self._send(self._last_raw, action, reward, bool(terminated or truncated))
        self._last_raw = obs
        self._step += 1
        return self.observation(obs), reward, terminated, truncated, info

    def _send(self, pixels, action, reward, done):
        message = messages.frame_message(self.episode, self._step, pixels, np.atleast_1d(np.asarray(action, dtype=np.float64)),
                                         reward, done)
        payload = messages.pack(message)
        msg_id = messages.msg_id(self.source, self.episode, self._step)
        self._window.acquire()
        future = self._loop.submit(self._publisher.publish_payload(payload, msg_id, wait=True))
        with self._flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future):
        with self._flight_lock:
            self._in_flight.discard(future)
        self._window.release()
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()

    def _raise_failure(self):
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    @property
    def pending(self):
        """Frames published and not yet acknowledged."""
        return len(self._in_flight)

    def flush(self, timeout=60.0):
        """Waits until every published frame is acknowledged (or failed: raised)."""
        with self._flight_lock:
            futures = list(self._in_flight)
        for future in futures:
            try:
                future.result(timeout)
            except Exception:
                pass
        self._raise_failure()

    # -- the end ----------------------------------------------------------

    def _shutdown(self, flush=True):
        try:
            if flush and self._in_flight:
                self.flush()
        finally:
            if self._loop is not None:
                if self._watcher is not None:
                    self._watcher.cancel()
                if self._nc is not None:
                    try:
                        self._loop.run(self._nc.close(), timeout=10)
                    except Exception:
                        pass
                self._loop.close()
                self._loop = None

    def close(self):
        """Waits for the last acks, stops following versions, closes NATS,
        then closes the environment."""
        if self._closed:
            return
        self._closed = True
        try:
            self._shutdown(flush=True)
        finally:
            super().close()
