"""Fixtures for the wmvae package's tests: the real parts, started here.

A real nats-server (the venv's, JetStream, a free loopback port, a
temporary store), a real ``target/release/wmvae serve`` daemon on it with a
config that makes versions every 10 steps of batch 16 on one thread, and
real CarRacing-v3 frames (gymnasium, fixed seeds, the example publisher's
driving policy) published through ``wmvae.Publisher``. All are session
scoped: started once, stopped at the end (SIGTERM, then SIGKILL).

Nothing here asserts timings: every wait is for a condition, with a
generous deadline.
"""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Hermetic: the tests name their server; no credentials from the shell.
for _key in [k for k in os.environ if k.startswith("WMVAE_")]:
    del os.environ[_key]
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

REPO = Path(__file__).resolve().parents[2]
NATS_SERVER = REPO / ".venv" / "bin" / "nats-server"
WMVAE = REPO / "target" / "release" / "wmvae"
PYTHON = sys.executable

# The published data: two CarRacing-v3 episodes, the second's id hostile
# enough to need escaping in Nats-Msg-Id ('/', a space, non-ASCII, '%').
SOURCE = "pytest"
EPISODES = [("ep-0", 0, 160), ("ep 1/ü%", 1, 140)]  # (episode, seed, frames)

DAEMON_CONFIG = """\
# wmvae serve for the Python tests: versions every 10 steps of batch 16,
# one libtorch thread, training at most 4 samples per frame ingested (so
# it idles once it has caught up), no HTTP, no validation split.
[http]
addr = ""
[train]
device = "cpu"
threads = 1
min_frames = 100
batch_size = 16
samples_per_insert = 4.0
checkpoint_every_steps = 10
eval_every_steps = 10
log_every_steps = 10
keep_last = 1000
[buffer]
validation_fraction = 0.0
capacity = 100000
[ingest]
ack_wait_secs = 2
"""


def wait_until(what, condition, timeout=180.0, interval=0.25):
    """Polls `condition` until it returns something truthy (returned);
    fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def run_async(coro):
    return asyncio.run(coro)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc, grace=60):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Nats:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    assert NATS_SERVER.exists(), f"{NATS_SERVER} missing: run scripts/setup"
    directory = tmp_path_factory.mktemp("nats")
    for _ in range(4):  # a port picked free may be taken before the server binds it
        port = _free_port()
        conf = directory / "nats.conf"
        conf.write_text(f'listen: 127.0.0.1:{port}\n'
                        f'jetstream {{ store_dir: "{directory / "js"}", max_file_store: 68719476736 }}\n')
        log = directory / "nats.log"
        proc = subprocess.Popen([str(NATS_SERVER), "-c", str(conf)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while proc.poll() is None and not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None and _listening(port):
            break
        _stop(proc)
    else:
        pytest.fail(f"nats-server did not start: {log.read_text()[-2000:]}")
    yield Nats(proc, f"nats://127.0.0.1:{port}", log)
    _stop(proc, grace=10)


class Daemon:
    def __init__(self, proc, url, data_dir, log):
        self.proc, self.url, self.data_dir, self.log = proc, url, data_dir, log

    def logs(self):
        return self.log.read_text(errors="replace")

    def check_alive(self):
        if self.proc.poll() is not None:
            pytest.fail(f"wmvae serve exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")


def active_version(url):
    """KV wm-meta/active as a dict, or None."""
    from wmvae import checkpoints, connect

    async def read():
        nc = await connect(url)
        try:
            return await checkpoints.active_version(nc.jetstream())
        finally:
            await nc.close()

    return run_async(read())


@pytest.fixture(scope="session")
def daemon(nats_server, tmp_path_factory):
    assert WMVAE.exists(), f"{WMVAE} missing: build it (cargo build --release)"
    directory = tmp_path_factory.mktemp("daemon")
    config = directory / "wmvae.toml"
    config.write_text(DAEMON_CONFIG)
    log = directory / "serve.log"
    proc = subprocess.Popen(
        [str(WMVAE), "serve", "--config", str(config), "--nats-url", nats_server.url, "--data-dir", str(directory / "store")],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    d = Daemon(proc, nats_server.url, directory, log)

    def first_version():
        d.check_alive()
        return active_version(nats_server.url)

    wait_until("the daemon's version 1", first_version, timeout=120, interval=0.5)
    yield d
    _stop(proc)


def carracing_frames(seed, count):
    """`count` raw CarRacing-v3 frames (96x96x3 uint8) from a reset with
    `seed`, the actions the example's policy took on them, rewards, dones
    (the last frame done)."""
    import gymnasium as gym

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from carracing_publisher import policy
    finally:
        sys.path.remove(str(REPO / "examples"))
    env = gym.make("CarRacing-v3", render_mode="rgb_array")
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames, actions, rewards = [], [], []
    for step in range(count):
        action = policy(obs, step, rng)
        frames.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(float(reward))
        assert not (terminated or truncated), "the episode ended early"
    env.close()
    dones = [False] * (count - 1) + [True]
    return np.stack(frames), np.stack(actions), np.asarray(rewards, np.float32), np.asarray(dones)


class Published:
    """What the session published: per episode, frames, actions, rewards, dones."""

    def __init__(self, source, episodes):
        self.source = source
        self.episodes = episodes  # {episode: (frames, actions, rewards, dones)}

    @property
    def count(self):
        return sum(len(e[0]) for e in self.episodes.values())

    def frame(self, episode, step):
        return self.episodes[episode][0][step]


@pytest.fixture(scope="session")
def published(daemon):
    """Real CarRacing frames published through wmvae.Publisher; returns
    once the daemon has made version 2 from them."""
    import wmvae

    episodes = {name: carracing_frames(seed, count) for name, seed, count in EPISODES}

    async def publish():
        async with wmvae.Publisher(SOURCE, daemon.url, max_pending=64) as pub:
            for name, (frames, actions, rewards, dones) in episodes.items():
                for step in range(len(frames)):
                    await pub.publish(name, step, frames[step], action=actions[step], reward=rewards[step],
                                      done=dones[step], wait=False)
            await pub.flush()

    run_async(publish())

    def version_2():
        daemon.check_alive()
        active = active_version(daemon.url)
        return active is not None and active["version"] >= 2

    wait_until("version 2 from the published frames", version_2, timeout=240, interval=0.5)
    return Published(SOURCE, episodes)


def read_latents(url, source, count, timeout=180):
    """Every latent of `source`, once the stream holds at least `count`."""
    import wmvae

    async def read():
        return [latent async for latent in wmvae.latents(source, url, follow=False)]

    return wait_until(f"{count} latents of {source}", lambda: (lambda ls: ls if len(ls) >= count else None)(run_async(read())),
                      timeout=timeout, interval=1.0)
