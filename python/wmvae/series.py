"""Series: the memory model's training data on disk.

Role: read (and write) the layout ``wmvae series`` produces, one ``.npz``
per episode and an ``index.json`` beside them:

    DIR/index.json   [{"source", "episode", "file", "frames"}, ...]
                     ``file`` relative to DIR
    DIR/<file>.npz   mu, logvar  float32 (T, 32)
                     action      float32 (T, A)
                     reward      float32 (T,)
                     done        bool    (T,)
                     step        int64   (T,)   in increasing order
                     version     int64   scalar (the model version that encoded it)
                     sha256      str     scalar (that version's weights)

``read_series`` checks all of it (shapes, dtypes, T == frames, steps in
order) and refuses index entries that would leave DIR (absolute paths,
``..``, links out). ``write_episode`` and ``write_index`` write the same
layout, e.g. from ``latents()`` grouped by episode
(``arrays_from_latents``).

It does not fetch anything from NATS or re-encode frames; it loads no
pickles (``allow_pickle=False``).
"""
import json
import os
import re
import tempfile

import numpy as np

INDEX = "index.json"
FIELDS = ("mu", "logvar", "action", "reward", "done", "step", "version", "sha256")


class SeriesError(ValueError):
    """A series directory that does not follow the layout."""


def _inside(directory, name):
    """The path of index entry `name` under `directory`; SeriesError when
    it is absolute, climbs with '..' or resolves outside."""
    if not isinstance(name, str) or not name:
        raise SeriesError(f"index entry file must be a non-empty string, not {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise SeriesError(f"index entry file {name!r} is absolute")
    parts = re.split(r"[\\/]", name)
    if ".." in parts:
        raise SeriesError(f"index entry file {name!r} leaves the directory")
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise SeriesError(f"index entry file {name!r} resolves outside {directory}")
    return path


def check_arrays(arrays, frames=None, where="episode"):
    """Checks an episode's arrays against the layout; returns them (with
    ``version`` as int and ``sha256`` as str). Raises SeriesError."""
    missing = [k for k in FIELDS if k not in arrays]
    if missing:
        raise SeriesError(f"{where}: missing {', '.join(missing)}")
    mu, logvar = arrays["mu"], arrays["logvar"]

    def need(ok, what):
        if not ok:
            raise SeriesError(f"{where}: {what}")

    need(mu.dtype == np.float32 and mu.ndim == 2, f"mu must be float32 (T, z), not {mu.dtype} {mu.shape}")
    t = mu.shape[0]
    need(logvar.dtype == np.float32 and logvar.shape == mu.shape, f"logvar must be float32 {mu.shape}, not {logvar.dtype} {logvar.shape}")
    action = arrays["action"]
    need(action.dtype == np.float32 and action.ndim == 2 and action.shape[0] == t, f"action must be float32 ({t}, A), not {action.dtype} {action.shape}")
    need(arrays["reward"].dtype == np.float32 and arrays["reward"].shape == (t,), f"reward must be float32 ({t},), not {arrays['reward'].dtype} {arrays['reward'].shape}")
    need(arrays["done"].dtype == np.bool_ and arrays["done"].shape == (t,), f"done must be bool ({t},), not {arrays['done'].dtype} {arrays['done'].shape}")
    step = arrays["step"]
    need(step.dtype == np.int64 and step.shape == (t,), f"step must be int64 ({t},), not {step.dtype} {step.shape}")
    need(bool(np.all(np.diff(step) > 0)), "steps are not in increasing order")
    version, sha = np.asarray(arrays["version"]), np.asarray(arrays["sha256"])
    need(version.dtype == np.int64 and version.shape == (), f"version must be an int64 scalar, not {version.dtype} {version.shape}")
    need(sha.dtype.kind == "U" and sha.shape == (), f"sha256 must be a str scalar, not {sha.dtype} {sha.shape}")
    if frames is not None:
        need(t == frames, f"{t} steps, the index says {frames}")
    out = dict(arrays)
    out["version"] = int(version)
    out["sha256"] = str(sha)
    return out


def read_index(directory):
    """DIR/index.json, checked: a list of {"source", "episode", "file",
    "frames"}, each file inside DIR. Entries get ``path`` (absolute)."""
    try:
        with open(os.path.join(directory, INDEX), encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise SeriesError(f"{directory}: no {INDEX}") from None
    except json.JSONDecodeError as e:
        raise SeriesError(f"{directory}/{INDEX}: not JSON ({e})") from None
    if not isinstance(index, list):
        raise SeriesError(f"{directory}/{INDEX}: must be a list")
    entries = []
    for i, entry in enumerate(index):
        if not isinstance(entry, dict):
            raise SeriesError(f"{INDEX}[{i}]: must be an object")
        for key, kind in (("source", str), ("episode", str), ("file", str), ("frames", int)):
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                raise SeriesError(f"{INDEX}[{i}]: {key} must be {kind.__name__}, not {entry.get(key)!r}")
        if entry["frames"] < 0:
            raise SeriesError(f"{INDEX}[{i}]: frames must be >= 0")
        entries.append(dict(entry, path=_inside(directory, entry["file"])))
    return entries


def read_episode(path, frames=None):
    """One episode file's arrays, checked."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return check_arrays(arrays, frames, where=os.path.basename(path))


def read_series(directory):
    """The episodes of series DIR, in index order, each a dict: ``source``,
    ``episode``, ``file``, ``frames``, ``path`` and the arrays ``mu``,
    ``logvar``, ``action``, ``reward``, ``done``, ``step``, with
    ``version`` (int) and ``sha256`` (str).

    The whole index is checked before anything is returned (SeriesError, a
    ValueError); each file is loaded and checked as the iteration reaches
    it. ``list(read_series(d))`` loads them all."""
    entries = read_index(directory)

    def episodes():
        for entry in entries:
            out = dict(entry)
            out.update(read_episode(entry["path"], entry["frames"]))
            yield out

    return episodes()


def arrays_from_latents(latents):
    """An episode's arrays from its latent dicts (as ``wmvae.latents``
    yields them), in step order: ``action`` NaN where a frame had none (or
    fewer values), ``reward`` NaN where none, ``done`` False where none.
    ``version`` is the latents' model version when they share one, else -1;
    ``sha256`` is left "" (fill it in when known)."""
    latents = sorted(latents, key=lambda latent: latent["step"])
    width = max((len(latent["action"]) for latent in latents if latent.get("action") is not None), default=0)
    action = np.full((len(latents), width), np.nan, dtype=np.float32)
    for row, latent in zip(action, latents):
        if latent.get("action") is not None:
            given = np.asarray(latent["action"], dtype=np.float32)
            row[: len(given)] = given
    versions = {int(latent["model_version"]) for latent in latents}
    return {
        "mu": np.asarray([latent["mu"] for latent in latents], dtype=np.float32).reshape(len(latents), -1),
        "logvar": np.asarray([latent["logvar"] for latent in latents], dtype=np.float32).reshape(len(latents), -1),
        "action": action,
        "reward": np.asarray([np.nan if latent.get("reward") is None else latent["reward"] for latent in latents], dtype=np.float32),
        "done": np.asarray([bool(latent.get("done")) for latent in latents], dtype=np.bool_),
        "step": np.asarray([latent["step"] for latent in latents], dtype=np.int64),
        "version": np.int64(versions.pop() if len(versions) == 1 else -1),
        "sha256": np.str_(""),
    }


def safe_name(name):
    """A file-name-safe form of a source or episode name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def write_episode(directory, source, episode, arrays, file=None):
    """Writes one episode's arrays (checked first) as DIR/<file>
    (default ``<source>__<episode>.npz``, made file-name safe); returns its
    index entry."""
    arrays = dict(arrays)
    arrays["version"] = np.int64(arrays["version"])
    arrays["sha256"] = np.str_(arrays["sha256"])
    checked = check_arrays(arrays, where=f"{source}/{episode}")
    file = file or f"{safe_name(source)}__{safe_name(episode)}.npz"
    path = _inside(directory, file)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:  # a file object: savez would append ".npz" to a name
        np.savez(f, **{k: np.asarray(arrays[k]) for k in FIELDS})
    return {"source": source, "episode": episode, "file": file, "frames": int(checked["mu"].shape[0])}


def write_index(directory, entries):
    """Writes DIR/index.json (atomically: a reader sees the old or the new)."""
    entries = [{k: e[k] for k in ("source", "episode", "file", "frames")} for e in entries]
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, os.path.join(directory, INDEX))
