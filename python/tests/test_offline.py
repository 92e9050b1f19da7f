"""The package's pure parts, without a server: message ids and the checks
before publishing, the preprocessing, the frame message, the series layout
(read, write, refusals), the model's shapes."""
import json
import os

import msgpack
import numpy as np
import pytest
from PIL import Image

import wmvae
from wmvae import messages, series
from wmvae.preprocess import preprocess


def test_msg_ids_escape_every_byte_outside_printable_ascii_and_percent_and_slash():
    assert wmvae.msg_id("worker-1", "ep-1", 0) == "worker-1/ep-1/0"
    assert messages.msg_id("s", "a/b", 7) == "s/a%2Fb/7"
    assert messages.msg_id("s", "100%", 1) == "s/100%25/1"
    assert messages.msg_id("s", "a b", 1) == "s/a%20b/1"
    assert messages.msg_id("s", "ü", 1) == "s/%C3%BC/1"
    assert messages.escape_id_part("\x7f~!\x00") == "%7F~!%00"
    assert messages.msg_id("wörker", "e", 2) == "w%C3%B6rker/e/2"
    # Distinct identities never share an id.
    assert messages.msg_id("s", "a/b", 1) != messages.msg_id("s", "a%2Fb", 1)
    every = "".join(chr(c) for c in range(0x20, 0x7F)) + "é€😀"
    escaped = messages.escape_id_part(every)
    assert all(0x21 <= ord(c) <= 0x7E for c in escaped) and "/" not in escaped
    assert escaped.startswith("%20!") and escaped.endswith("%C3%A9%E2%82%AC%F0%9F%98%80")


@pytest.mark.parametrize("source", ["", "a.b", "a b", "a\tb", "a*", "a>", "x\x00", "\u00a0", "\x85", "s" * 257])
def test_bad_sources_are_refused(source):
    with pytest.raises(ValueError):
        messages.check_source(source)
    with pytest.raises(ValueError):
        wmvae.Publisher(source, "nats://127.0.0.1:1")


@pytest.mark.parametrize("episode", ["", "a\nb", "a\x00", "\x1b[31m", "a\x7fb", "x" * 257])
def test_bad_episodes_are_refused(episode):
    with pytest.raises(ValueError):
        messages.msg_id("s", episode, 0)


def test_bad_steps_and_transitions_are_refused():
    px = np.zeros((64, 64, 3), np.uint8)
    for step in (-1, 2 ** 53, 1.5, True):
        with pytest.raises(ValueError):
            messages.frame_message("e", step, px)
    with pytest.raises(ValueError):
        messages.frame_message("e", 0, px, action=[float("nan")])
    with pytest.raises(ValueError):
        messages.frame_message("e", 0, px, action=np.zeros(65))
    with pytest.raises(ValueError):
        messages.frame_message("e", 0, px, reward=float("inf"))
    with pytest.raises(ValueError):
        messages.frame_message("e", 0, px.astype(np.float32))
    with pytest.raises(ValueError):
        messages.frame_message("e", 0, np.zeros((64, 64, 4), np.uint8))


def test_frame_message_follows_the_contract():
    px = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    message = messages.frame_message("ep", 3, px, action=np.array([0.5, 1, 0], np.float32), reward=np.float32(0.25), done=True)
    decoded = msgpack.unpackb(messages.pack(message))
    assert decoded == {"episode": "ep", "step": 3, "height": 96, "width": 96, "channels": 3, "pixels": px.tobytes(),
                       "action": [0.5, 1.0, 0.0], "reward": 0.25, "done": True}
    assert "action" not in messages.frame_message("ep", 0, px)


def test_preprocessing_is_the_world_models_crop_and_pil_bilinear_resize():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    out = preprocess(big)
    assert out.shape == (5, 64, 64, 3) and out.dtype == np.uint8
    for frame, small in zip(big, out):
        expected = np.asarray(Image.fromarray(frame[:84]).resize((64, 64), Image.BILINEAR))
        assert np.array_equal(small, expected)
    small = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert np.array_equal(preprocess(small), small)
    assert preprocess(big[0]).shape == (64, 64, 3)
    for bad in (np.zeros((50, 50, 3), np.uint8), np.zeros((96, 96, 3), np.float32), np.zeros((96, 96), np.uint8)):
        with pytest.raises(ValueError):
            preprocess(bad)


def test_the_model_has_the_daemons_state_dict_names_and_shapes():
    torch = pytest.importorskip("torch")
    from wmvae.model import VAE

    names = set(VAE().state_dict())
    for layer in ("encoder.conv1", "encoder.conv2", "encoder.conv3", "encoder.conv4", "encoder.fc_mu", "encoder.fc_logvar",
                  "decoder.fc", "decoder.deconv1", "decoder.deconv2", "decoder.deconv3", "decoder.deconv4"):
        assert {f"{layer}.weight", f"{layer}.bias"} <= names
    torch.manual_seed(0)
    vae = VAE().eval()
    frames = np.random.default_rng(2).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    mu, logvar = vae.encode(frames)
    assert mu.shape == logvar.shape == (3, 32) and mu.dtype == np.float32
    assert vae.encode(frames[0])[0].shape == (32,)
    pictures = vae.decode(mu)
    assert pictures.shape == (3, 64, 64, 3) and pictures.dtype == np.uint8
    assert vae.decode(mu[0]).shape == (64, 64, 3)


def episode_arrays(t, seed=0, version=3, sha="ab" * 32):
    rng = np.random.default_rng(seed)
    return {
        "mu": rng.standard_normal((t, 32)).astype(np.float32),
        "logvar": rng.standard_normal((t, 32)).astype(np.float32),
        "action": rng.standard_normal((t, 3)).astype(np.float32),
        "reward": rng.standard_normal(t).astype(np.float32),
        "done": np.arange(t) == t - 1,
        "step": np.arange(t, dtype=np.int64),
        "version": version,
        "sha256": sha,
    }


def write_raw(directory, name, arrays):
    with open(os.path.join(directory, name), "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def test_read_series_reads_the_pinned_layout(tmp_path):
    entries = [series.write_episode(tmp_path, "car", "e1", episode_arrays(12, 1)),
               series.write_episode(tmp_path, "car", "e/2", episode_arrays(5, 2, version=4))]
    series.write_index(tmp_path, entries)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index == [{"source": "car", "episode": "e1", "file": "car__e1.npz", "frames": 12},
                     {"source": "car", "episode": "e/2", "file": "car__e_2.npz", "frames": 5}]
    # Read as raw NumPy: the pinned dtypes and shapes.
    with np.load(tmp_path / "car__e1.npz") as z:
        assert {k: (z[k].dtype.str, z[k].shape) for k in z.files} == {
            "mu": ("<f4", (12, 32)), "logvar": ("<f4", (12, 32)), "action": ("<f4", (12, 3)), "reward": ("<f4", (12,)),
            "done": ("|b1", (12,)), "step": ("<i8", (12,)), "version": ("<i8", ()), "sha256": ("<U64", ())}
    episodes = list(wmvae.read_series(tmp_path))
    assert [(e["source"], e["episode"], e["frames"], e["version"], e["sha256"]) for e in episodes] == [
        ("car", "e1", 12, 3, "ab" * 32), ("car", "e/2", 5, 4, "ab" * 32)]
    expected = episode_arrays(12, 1)
    for key in ("mu", "logvar", "action", "reward", "done", "step"):
        assert np.array_equal(episodes[0][key], expected[key])


def test_read_series_stays_inside_its_directory(tmp_path):
    inner = tmp_path / "series"
    inner.mkdir()
    write_raw(tmp_path, "outside.npz", {k: v for k, v in episode_arrays(3).items()})
    os.symlink(tmp_path / "outside.npz", inner / "link.npz")
    for name in ("../outside.npz", str(tmp_path / "outside.npz"), "sub/../../outside.npz", "link.npz", "..\\outside.npz"):
        (inner / "index.json").write_text(json.dumps([{"source": "s", "episode": "e", "file": name, "frames": 3}]))
        with pytest.raises(wmvae.SeriesError):
            wmvae.read_series(inner)


@pytest.mark.parametrize("change, why", [
    (lambda a: a.update(step=a["step"].astype(np.uint64)), "step must be int64"),
    (lambda a: a.update(step=a["step"][::-1].copy()), "order"),
    (lambda a: a.update(mu=a["mu"].astype(np.float64)), "mu must be float32"),
    (lambda a: a.update(logvar=a["logvar"][:, :16]), "logvar"),
    (lambda a: a.update(action=a["action"][:, 0]), "action"),
    (lambda a: a.update(done=a["done"].astype(np.uint8)), "done"),
    (lambda a: a.update(version=np.array([3])), "version"),
    (lambda a: a.update(sha256=np.int64(3)), "sha256"),
    (lambda a: a.pop("reward"), "missing reward"),
])
def test_read_series_checks_every_array(tmp_path, change, why):
    arrays = episode_arrays(4)
    arrays["version"], arrays["sha256"] = np.int64(arrays["version"]), np.str_(arrays["sha256"])
    change(arrays)
    write_raw(tmp_path, "e.npz", arrays)
    (tmp_path / "index.json").write_text(json.dumps([{"source": "s", "episode": "e", "file": "e.npz", "frames": 4}]))
    with pytest.raises(wmvae.SeriesError, match=why):
        list(wmvae.read_series(tmp_path))


def test_read_series_checks_the_index(tmp_path):
    series.write_index(tmp_path, [series.write_episode(tmp_path, "s", "e", episode_arrays(4))])
    assert len(list(wmvae.read_series(tmp_path))) == 1
    for index in ([{"source": "s", "episode": "e", "file": "s__e.npz", "frames": 5}],):
        (tmp_path / "index.json").write_text(json.dumps(index))
        with pytest.raises(wmvae.SeriesError, match="index says 5"):
            list(wmvae.read_series(tmp_path))
    for index in ({"not": "a list"}, [{"source": "s", "episode": "e", "file": "s__e.npz"}], ["x"],
                  [{"source": "s", "episode": "e", "file": "s__e.npz", "frames": True}]):
        (tmp_path / "index.json").write_text(json.dumps(index))
        with pytest.raises(wmvae.SeriesError):
            wmvae.read_series(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(wmvae.SeriesError, match="no index.json"):
        wmvae.read_series(tmp_path)


def test_arrays_from_latents_orders_steps_and_fills_gaps():
    latents = [{"step": s, "model_version": 2, "mu": np.full(32, s, np.float32), "logvar": np.zeros(32, np.float32),
                "action": None if s == 1 else np.array([s, 1.0], np.float32), "reward": None if s == 1 else 0.5,
                "done": s == 2} for s in (2, 0, 1)]
    arrays = series.arrays_from_latents(latents)
    assert arrays["step"].tolist() == [0, 1, 2] and arrays["mu"][:, 0].tolist() == [0, 1, 2]
    assert np.isnan(arrays["action"][1]).all() and arrays["action"][2].tolist() == [2, 1]
    assert np.isnan(arrays["reward"][1]) and arrays["done"].tolist() == [False, False, True]
    assert int(arrays["version"]) == 2
    latents[0]["model_version"] = 3
    assert int(series.arrays_from_latents(latents)["version"]) == -1
