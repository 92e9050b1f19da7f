"""The package against a live daemon and real CarRacing-v3 frames
(conftest.py starts them): publishing (ids, dedup, retries), latents,
load_vae (sha256 checked, the daemon's own encode within 1e-4), decode,
LatentObservation (observations, publishing, version swaps), series and
the MDN-RNN example, and the examples that now use the package."""
import hashlib
import re
import subprocess
from collections import defaultdict

import numpy as np
import pytest

import wmvae
from wmvae import checkpoints, series
from conftest import PYTHON, REPO, WMVAE, active_version, read_latents, run_async, wait_until

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def stream_latents(published, daemon):
    """Every latent of the published frames (one each, checked here once)."""
    latents = read_latents(daemon.url, published.source, published.count)
    return latents


def fetch(url, version, sha256=None):
    async def get():
        nc = await wmvae.connect(url)
        try:
            return await checkpoints.fetch_weights(nc.jetstream(), version, sha256)
        finally:
            await nc.close()

    return run_async(get())


def announced(url, version):
    async def get():
        nc = await wmvae.connect(url)
        try:
            return await checkpoints.announcement(nc.jetstream(), version)
        finally:
            await nc.close()

    return run_async(get())


# -- publishing ---------------------------------------------------------------

def test_a_latent_per_published_frame(published, stream_latents):
    keys = [(latent["episode"], latent["step"]) for latent in stream_latents]
    expected = {(name, step) for name, data in published.episodes.items() for step in range(len(data[0]))}
    assert len(keys) == len(set(keys)) == published.count
    assert set(keys) == expected
    for latent in stream_latents:
        frames, actions, rewards, dones = published.episodes[latent["episode"]]
        assert latent["source"] == published.source
        assert latent["model_version"] >= 1
        assert latent["mu"].shape == latent["logvar"].shape == (32,) and latent["mu"].dtype == np.float32
        assert np.array_equal(latent["action"], actions[latent["step"]])
        assert latent["reward"] == pytest.approx(float(rewards[latent["step"]]), abs=1e-6)
        assert latent["done"] == bool(dones[latent["step"]])


def test_the_stream_latents_are_the_local_models_within_1e4(published, stream_latents, daemon):
    by_version = defaultdict(list)
    for latent in stream_latents:
        by_version[latent["model_version"]].append(latent)
    for version in sorted(by_version)[-2:]:  # the last two versions that encoded them
        vae = wmvae.load_vae(version, daemon.url)
        latents = by_version[version]
        frames = np.stack([published.frame(latent["episode"], latent["step"]) for latent in latents])
        mu, logvar = vae.encode(frames)
        assert np.abs(mu - np.stack([latent["mu"] for latent in latents])).max() < TOLERANCE
        assert np.abs(logvar - np.stack([latent["logvar"] for latent in latents])).max() < TOLERANCE


def test_a_republished_frame_is_stored_once_and_escaped_ids_never_collide(daemon):
    frame = np.full((64, 64, 3), 90, np.uint8)
    # Unescaped, both ids would read "dd/x/e ü/0" and JetStream (which dedups
    # across the whole stream) would drop the second frame.
    first_source, first_episode = "dd", "x/e ü"
    second_source, second_episode = "dd/x", "e ü"

    async def publish():
        async with wmvae.Publisher(first_source, daemon.url) as one, wmvae.Publisher(second_source, daemon.url) as two:
            first = await one.publish(first_episode, 0, frame, action=[0.0], reward=0.0, done=True)
            again = await one.publish(first_episode, 0, frame, action=[0.0], reward=0.0, done=True)
            other = await two.publish(second_episode, 0, frame, done=True)
        nc = await wmvae.connect(daemon.url)
        info = await nc.jetstream().stream_info("WM_FRAMES", subjects_filter="wm.frames.>")
        await nc.close()
        return first, again, other, info

    assert wmvae.msg_id(first_source, first_episode, 0) == "dd/x%2Fe%20%C3%BC/0"
    assert wmvae.msg_id(second_source, second_episode, 0) == "dd%2Fx/e%20%C3%BC/0"
    first, again, other, info = run_async(publish())
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert not other.duplicate and other.seq != first.seq
    assert {k: v for k, v in info.state.subjects.items() if k.startswith("wm.frames.dd")} == {"wm.frames.dd": 1, "wm.frames.dd/x": 1}
    assert [latent["episode"] for latent in read_latents(daemon.url, first_source, 1)] == [first_episode]
    assert [latent["episode"] for latent in read_latents(daemon.url, second_source, 1)] == [second_episode]


def test_publish_retries_then_gives_up_where_no_stream_answers(nats_server):
    import nats.js.errors

    pub = wmvae.Publisher("lonely", nats_server.url, prefix="nostream", retry_pauses=(0.05, 0.05), ack_timeout=1)

    async def attempt():
        try:
            await pub.publish("e", 0, np.zeros((64, 64, 3), np.uint8))
        finally:
            await pub.close(flush=False)

    with pytest.raises(nats.js.errors.NoStreamResponseError):
        run_async(attempt())
    assert pub.retries == 2


def test_a_sync_publisher_with_a_window_of_acks(daemon):
    frames = np.random.default_rng(5).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    with wmvae.SyncPublisher("sync-src", daemon.url, max_pending=4) as pub:
        for step, frame in enumerate(frames):
            pub.publish("e", step, frame, action=[step], reward=1.0, done=step == 19, wait=False)
        pub.flush()
        assert pub.pending == 0
    latents = read_latents(daemon.url, "sync-src", 20)
    assert sorted(latent["step"] for latent in latents) == list(range(20))


# -- checkpoints ---------------------------------------------------------------

def test_load_vae_fetches_the_active_version_sha256_checked(published, daemon):
    active = active_version(daemon.url)
    vae = wmvae.load_vae(nats_url=daemon.url)
    import torch

    assert isinstance(vae, torch.nn.Module) and not vae.training
    assert vae.version >= active["version"] >= 2
    if vae.version == active["version"]:
        assert vae.sha256 == active["sha256"]
    data, digest = fetch(daemon.url, vae.version)
    assert digest == hashlib.sha256(data).hexdigest() == vae.sha256
    with pytest.raises(wmvae.ChecksumError):
        fetch(daemon.url, vae.version, "0" * 64)


def test_a_pinned_version_is_checked_against_its_announcement(published, daemon):
    vae = wmvae.load_vae(1, daemon.url)
    assert vae.version == 1
    assert vae.sha256 == announced(daemon.url, 1)["sha256"]
    with pytest.raises(LookupError):
        wmvae.load_vae(10 ** 6, daemon.url)


def test_load_vae_encodes_as_wmvae_encode_within_1e4(published, daemon, tmp_path):
    vae = wmvae.load_vae(nats_url=daemon.url)
    frames = np.concatenate([data[0][::9] for data in published.episodes.values()])  # 96x96 CarRacing frames
    np.save(tmp_path / "frames.npy", frames)
    data, _ = fetch(daemon.url, vae.version, vae.sha256)
    (tmp_path / "w.safetensors").write_bytes(data)
    mu, logvar = vae.encode(frames)
    for how in (["--weights", str(tmp_path / "w.safetensors")],
                ["--checkpoint", str(vae.version), "--online", "--nats-url", daemon.url]):
        out = tmp_path / "latents.npz"
        run = subprocess.run([str(WMVAE), "encode", *how, "--input", str(tmp_path / "frames.npy"), "--output", str(out),
                              "--device", "cpu"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        with np.load(out) as theirs:
            assert theirs["mu"].shape == mu.shape == (len(frames), 32)
            assert np.abs(theirs["mu"] - mu).max() < TOLERANCE, how
            assert np.abs(theirs["logvar"] - logvar).max() < TOLERANCE, how
        out.unlink()


def test_the_local_decode_gives_64x64_rgb_frames(published, daemon):
    vae = wmvae.load_vae(nats_url=daemon.url)
    frames = np.stack([published.frame("ep-0", s) for s in (60, 80, 100)])
    mu, _ = vae.encode(frames)
    pictures = vae.decode(mu)
    assert pictures.shape == (3, 64, 64, 3) and pictures.dtype == np.uint8
    assert pictures.std() > 0


def test_decode_through_the_daemon(published, daemon):
    z = np.random.default_rng(3).standard_normal((300, 32)).astype(np.float32)  # two requests
    pictures = wmvae.decode(z, nats_url=daemon.url)
    assert pictures.shape == (300, 64, 64, 3) and pictures.dtype == np.uint8
    version = active_version(daemon.url)["version"]
    vae = wmvae.load_vae(version, daemon.url)
    pinned = wmvae.decode(z[:4], version=version, nats_url=daemon.url)
    assert np.abs(pinned.astype(int) - vae.decode(z[:4]).astype(int)).max() <= 1
    assert wmvae.decode(z[0], nats_url=daemon.url).shape == (64, 64, 3)
    with pytest.raises(checkpoints.DaemonError):
        wmvae.decode(z[:2], version=99_999, nats_url=daemon.url)


# -- the gymnasium wrapper -------------------------------------------------------

class Recorder:
    """Wraps an env (gymnasium.Wrapper) and keeps its raw observations."""

    def __new__(cls, env):
        import gymnasium

        class _Recorder(gymnasium.Wrapper):
            def __init__(self, env):
                super().__init__(env)
                self.raw = []

            def reset(self, **kwargs):
                obs, info = self.env.reset(**kwargs)
                self.raw.append(obs)
                return obs, info

            def step(self, action):
                out = self.env.step(action)
                self.raw.append(out[0])
                return out

        return _Recorder(env)


def test_latent_observation_on_carracing_publishes_and_follows_versions(published, daemon):
    import gymnasium as gym

    recorder = Recorder(gym.make("CarRacing-v3", render_mode="rgb_array"))
    env = wmvae.LatentObservation(recorder, nats_url=daemon.url, publish=True, source="gym-test")
    try:
        assert env.observation_space.shape == (32,) and env.observation_space.dtype == np.float32
        first_version = env.model_version
        z, _ = env.reset(seed=3)
        assert z.shape == (32,) and z.dtype == np.float32
        observed = [(z, first_version)]
        actions = []
        rng = np.random.default_rng(4)
        for step in range(100):
            action = np.array([rng.uniform(-0.5, 0.5), 0.3, 0.0], np.float32)
            before = env.model_version
            z, reward, terminated, truncated, _ = env.step(action)
            observed.append((z, before if env.model_version == before else None))
            actions.append(action)
            assert z.shape == (32,) and z.dtype == np.float32 and not (terminated or truncated)
        env.flush()
        episode = env.episode
        # Acting collected training data: every frame acted on, with its action, became a latent.
        latents = read_latents(daemon.url, "gym-test", 100)
        assert sorted(latent["step"] for latent in latents) == list(range(100))
        assert {latent["episode"] for latent in latents} == {episode}
        for latent in latents:
            assert np.array_equal(latent["action"], actions[latent["step"]])
        # Each observation is the model's mu for that raw frame.
        vaes = {}
        for (z, version), raw in list(zip(observed, recorder.raw))[::10]:
            if version is not None:
                vae = vaes.setdefault(version, wmvae.load_vae(version, daemon.url))
                assert np.abs(vae.encode(raw)[0] - z).max() < 1e-5
        # The frames trained new versions; the wrapper swapped each in.
        wait_until("a newer active version", lambda: active_version(daemon.url)["version"] > first_version)
        wait_until("the wrapper on the active version",
                   lambda: env.model_version == active_version(daemon.url)["version"], timeout=120)
        assert env.swaps >= 1
        z, *_ = env.step(np.zeros(3, np.float32))
        assert z.shape == (32,)
    finally:
        env.close()


def test_a_pinned_latent_observation_keeps_its_version(published, daemon):
    import gymnasium as gym

    env = wmvae.LatentObservation(gym.make("CarRacing-v3"), nats_url=daemon.url, version=2)
    try:
        z, _ = env.reset(seed=0)
        for _ in range(5):
            z, *_ = env.step(np.array([0.0, 0.2, 0.0], np.float32))
        assert env.model_version == 2 and env.swaps == 0 and z.shape == (32,)
    finally:
        env.close()


def test_latent_observation_refuses_non_pixel_observations(daemon):
    import gymnasium as gym

    with pytest.raises(ValueError):
        wmvae.LatentObservation(gym.make("CartPole-v1"), nats_url=daemon.url)


# -- series and the memory model ---------------------------------------------------

def make_series(url, latents, directory):
    """The published episodes' latents in the pinned series layout."""
    grouped = defaultdict(list)
    for latent in latents:
        grouped[latent["episode"]].append(latent)
    entries = []
    for episode, items in sorted(grouped.items()):
        arrays = series.arrays_from_latents(items)
        if int(arrays["version"]) > 0:
            arrays["sha256"] = announced(url, int(arrays["version"]))["sha256"]
        entries.append(series.write_episode(directory, "pytest", episode, arrays))
    series.write_index(directory, entries)
    return entries


def test_series_from_the_daemons_latents_read_back(published, stream_latents, daemon, tmp_path):
    make_series(daemon.url, stream_latents, tmp_path)
    episodes = {e["episode"]: e for e in wmvae.read_series(tmp_path)}
    assert set(episodes) == set(published.episodes)
    for name, (frames, actions, rewards, dones) in published.episodes.items():
        e = episodes[name]
        assert e["frames"] == len(frames) and e["step"].tolist() == list(range(len(frames)))
        assert np.array_equal(e["action"], actions) and np.array_equal(e["done"], dones)


def test_wmvae_series_writes_what_read_series_reads(published, stream_latents, daemon, tmp_path):
    """`wmvae series` through the live daemon (its trainer encodes): the
    pinned layout, the published transitions, and the stream's latents of
    the same version."""
    version = min(latent["model_version"] for latent in stream_latents)
    run = subprocess.run([str(WMVAE), "series", "--version", str(version), "--source", published.source,
                          "--out", str(tmp_path), "--nats-url", daemon.url],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    episodes = {e["episode"]: e for e in wmvae.read_series(tmp_path)}
    sha256 = announced(daemon.url, version)["sha256"]
    for name, (frames, actions, rewards, dones) in published.episodes.items():
        e = episodes[name]
        assert e["frames"] == len(frames) and e["step"].tolist() == list(range(len(frames)))
        assert np.array_equal(e["action"], np.asarray(actions, dtype=np.float32)) and np.array_equal(e["done"], dones)
        assert np.allclose(e["reward"], rewards, rtol=1e-6)
        assert (e["version"], e["sha256"]) == (version, sha256)
    same = [latent for latent in stream_latents if latent["model_version"] == version]
    assert same
    for latent in same:
        assert np.allclose(episodes[latent["episode"]]["mu"][latent["step"]], latent["mu"], atol=TOLERANCE)


def train_mdn_rnn(series_dir, z):
    """The example's losses over 60 steps on `series_dir` (`--z z`)."""
    run = subprocess.run([PYTHON, str(REPO / "examples" / "train_mdn_rnn.py"), "--series", str(series_dir), "--steps", "60",
                          "--seq-len", "32", "--batch-size", "16", "--seed", "0", "--threads", "1", "--z", z],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    losses = [float(m.group(2)) for m in re.finditer(r"^step (\d+) loss (\S+)$", run.stdout, re.M)]
    assert len(losses) == 60, run.stdout
    assert all(np.isfinite(losses))
    return losses


def test_the_mdn_rnn_example_learns_the_next_z(published, stream_latents, daemon, tmp_path):
    """Learning is asserted on z = mu, whose next step is a function of the
    past: its loss fell 1.6-1.8 nats in 60 steps (3 runs here). With the
    paper's sampled z the target carries exp(logvar / 2) noise, and an early
    version's logvar is near 0, so the loss is floored near the noise's
    entropy (0.5 log(2 pi e) = 1.42) a few hundredths below where it starts:
    CI once measured a fall of 0.045, so that mode is only run, not judged."""
    make_series(daemon.url, stream_latents, tmp_path)
    losses = train_mdn_rnn(tmp_path, "mu")
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, losses
    train_mdn_rnn(tmp_path, "sample")


def test_the_latents_to_series_example_writes_a_readable_series(published, stream_latents, daemon, tmp_path):
    run = subprocess.run([PYTHON, str(REPO / "examples" / "latents_to_series.py"), "--out", str(tmp_path), daemon.url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    episodes = {(e["source"], e["episode"]): e for e in wmvae.read_series(tmp_path)}
    for name, (frames, *_rest) in published.episodes.items():
        e = episodes[(published.source, name)]
        assert e["step"].tolist() == list(range(len(frames)))
        if e["version"] > 0:
            assert e["sha256"] == announced(daemon.url, e["version"])["sha256"]


def test_the_other_examples_use_the_package(published, daemon, tmp_path):
    run = subprocess.run([PYTHON, str(REPO / "examples" / "wm_nats.py"), daemon.url], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "connected to" in run.stdout, run.stderr
    png = tmp_path / "recon.png"
    run = subprocess.run([PYTHON, str(REPO / "examples" / "load_in_pytorch.py"), daemon.url, str(png)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert png.exists() and re.match(r"v\d+: mu\[:4\]=", run.stdout)


