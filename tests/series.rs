//! `wmvae series` end to end through the binary, offline on a real sled
//! store with two versions: the files and index.json are the pinned layout
//! (read here byte by byte, and by the Python reader and the MDN-RNN
//! example), mu is `wmvae encode`'s, a rerun resumes, another version is
//! refused, and hostile episode names land in safe file names. Online,
//! through a live daemon's leading trainer on a real nats-server: the same.

mod common;

use common::nats::{wait_for_ingest_consumer, wait_until, Daemon, NatsServer};
use common::{frames, repo_root, venv_python, wmvae, FAST};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tch::Device;
use wmvae::frames::Frame;
use wmvae::store::{compress_frames, BufferConfig, Store};
use wmvae::vae::learner::Network;
use wmvae::vae::model::VaeConfig;

/// (source, episode, frames, with a transition): the last two names hostile.
const EPISODES: &[(&str, &str, usize, bool)] = &[
    ("car", "e1", 300, true),
    ("car", "../x", 20, false),
    ("car", "a/b\u{7}c\\d", 9, false),
];

fn episode_frames(source: &str, episode: &str, n: usize, transition: bool, seed: usize) -> Vec<Frame> {
    let pixels = frames(n + seed, 64, 64);
    (0..n)
        .map(|i| Frame {
            source: source.into(),
            episode: episode.into(),
            // Steps with gaps: the series keeps the stored ones, in order.
            step: 3 * i as u64 + 1,
            pixels: pixels[(seed + i) * 12288..(seed + i + 1) * 12288].to_vec().into(),
            action: transition.then(|| vec![i as f32, -1.0, 0.5]),
            reward: transition.then_some(i as f64 / 10.0),
            done: transition.then_some(i + 1 == n),
        })
        .collect()
}

/// A store with the episodes and two versions (v2 active); v1's weights file.
fn make_store(dir: &Path) -> PathBuf {
    let config = wmvae::config::Config::load(None).unwrap();
    let store = Store::open(
        &dir.join("store"),
        BufferConfig {
            capacity: 10_000,
            validation_fraction: 0.2,
        },
    )
    .unwrap();
    for (i, (source, episode, n, transition)) in EPISODES.iter().enumerate() {
        let frames = episode_frames(source, episode, *n, *transition, i * 7);
        store.commit(&frames, compress_frames(&frames), &[]).unwrap();
    }
    let weights_path = dir.join("v1.safetensors");
    for seed in [1, 2] {
        tch::manual_seed(seed);
        let weights = Network::new(Device::Cpu, VaeConfig::default()).weights_bytes().unwrap();
        if seed == 1 {
            std::fs::write(&weights_path, &weights).unwrap();
        }
        wmvae::versions::import(
            &store,
            None,
            &weights,
            "test",
            &config,
            &wmvae::store::Provenance::operator(wmvae::store::Change::Import, "test", None),
        )
        .unwrap();
    }
    weights_path
}

fn series(data: &Path, out: &Path, args: &[&str]) -> Output {
    wmvae()
        .args(["series", "--offline", "--device", "cpu", "--out"])
        .arg(out)
        .arg("--data-dir")
        .arg(data.join("store"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    stderr
}

/// An array of an .npz: numpy's dtype, the shape, the raw data.
type Array = (String, Vec<usize>, Vec<u8>);

fn read_npz(path: &Path) -> HashMap<String, Array> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).unwrap();
        let name = entry.name().strip_suffix(".npy").unwrap().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        let descr = header.split("'descr': '").nth(1).unwrap().split('\'').next().unwrap();
        let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
        let shape = shape.split(',').filter_map(|d| d.trim().parse().ok()).collect();
        out.insert(name, (descr.to_string(), shape, bytes[10 + header_len..].to_vec()));
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn index(out: &Path) -> Vec<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap()
}

#[test]
fn series_offline_layout_parity_resume_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let weights = make_store(data);
    let out = data.join("series");
    ok(series(data, &out, &["--version", "1"]));

    // index.json: every episode, in (source, episode) order, files inside the directory.
    let entries = index(&out);
    let mut expected: Vec<_> = EPISODES.iter().map(|e| (e.0, e.1, e.2)).collect();
    expected.sort();
    assert_eq!(entries.len(), expected.len());
    for (entry, (source, episode, n)) in entries.iter().zip(&expected) {
        assert_eq!(
            (entry["source"].as_str(), entry["episode"].as_str()),
            (Some(*source), Some(*episode))
        );
        assert_eq!(entry["frames"].as_u64(), Some(*n as u64));
        let file = entry["file"].as_str().unwrap();
        assert!(
            file.ends_with(".npz") && !file.starts_with('.') && file.chars().all(|c| c.is_ascii_graphic()),
            "{file:?}"
        );
        assert!(!file.contains(['/', '\\']) && !file.contains(".."), "{file:?}");
        assert!(out.join(file).is_file());
    }

    // e1's arrays: dtypes, shapes, steps in order, the transition, version and sha256.
    let e1 = entries.iter().find(|e| e["episode"] == "e1").unwrap();
    let arrays = read_npz(&out.join(e1["file"].as_str().unwrap()));
    let dtype = |k: &str| (arrays[k].0.as_str(), arrays[k].1.clone());
    assert_eq!(dtype("mu"), ("<f4", vec![300, 32]));
    assert_eq!(dtype("logvar"), ("<f4", vec![300, 32]));
    assert_eq!(dtype("action"), ("<f4", vec![300, 3]));
    assert_eq!(dtype("reward"), ("<f4", vec![300]));
    assert_eq!(dtype("done"), ("|b1", vec![300]));
    assert_eq!(dtype("step"), ("<i8", vec![300]));
    assert_eq!(dtype("version"), ("<i8", vec![]));
    assert_eq!(dtype("sha256"), ("<U64", vec![]));
    let steps: Vec<i64> = arrays["step"]
        .2
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(steps, (0..300).map(|i| 3 * i + 1).collect::<Vec<_>>());
    assert_eq!(&f32s(&arrays["action"].2)[3..6], &[1.0, -1.0, 0.5]);
    assert_eq!(f32s(&arrays["reward"].2)[10], 1.0);
    assert_eq!(arrays["done"].2.iter().filter(|d| **d == 1).count(), 1);
    assert_eq!(arrays["done"].2[299], 1);
    assert_eq!(arrays["version"].2, 1i64.to_le_bytes());
    let sha: String = arrays["sha256"].2.chunks_exact(4).map(|c| char::from(c[0])).collect();
    assert_eq!(
        sha,
        wmvae::vae::checkpoint::sha256_hex(&std::fs::read(&weights).unwrap())
    );

    // A frame without a transition: NaN action (width 0 in its episode), NaN reward, done false.
    let x = entries.iter().find(|e| e["episode"] == "../x").unwrap();
    let xs = read_npz(&out.join(x["file"].as_str().unwrap()));
    assert_eq!(xs["action"].1, vec![20, 0]);
    assert!(f32s(&xs["reward"].2).iter().all(|r| r.is_nan()));
    assert!(xs["done"].2.iter().all(|d| *d == 0));

    // mu is what `wmvae encode` makes of the same frames with v1's weights.
    let pixels: Vec<u8> = episode_frames("car", "e1", 300, true, 0)
        .iter()
        .flat_map(|f| f.pixels.to_vec())
        .collect();
    wmvae::frames::npy::write_frames(&data.join("e1.npy"), &pixels, 64, 64).unwrap();
    ok(wmvae()
        .args(["encode", "--device", "cpu", "--weights"])
        .arg(&weights)
        .arg("--input")
        .arg(data.join("e1.npy"))
        .arg("--output")
        .arg(data.join("e1.npz"))
        .output()
        .unwrap());
    let encoded = read_npz(&data.join("e1.npz"));
    let diff = f32s(&encoded["mu"].2)
        .iter()
        .zip(f32s(&arrays["mu"].2))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-5, "series mu differs from encode's by {diff}");

    resume_and_refusals(data, &out, &entries);
    python_reads_it(&out);
}

/// An interrupted run (its index holding one episode, a temporary file
/// left) is finished by a rerun; a finished one writes nothing; another
/// version is refused; `active` and `--episodes` choose.
fn resume_and_refusals(data: &Path, out: &Path, entries: &[serde_json::Value]) {
    // A gap between finished episodes: only it is encoded again.
    let ends = serde_json::to_vec(&[&entries[0], &entries[2]]).unwrap();
    std::fs::write(out.join("index.json"), ends).unwrap();
    std::fs::remove_file(out.join(entries[1]["file"].as_str().unwrap())).unwrap();
    let stderr = ok(series(data, out, &["--version", "1"]));
    assert!(stderr.contains("1 episodes written (9 frames"), "{stderr}");
    assert_eq!(index(out), entries);
    // The finished first one: the rest is encoded again.
    let first = serde_json::to_vec(&entries[..1]).unwrap();
    std::fs::write(out.join("index.json"), first).unwrap();
    std::fs::remove_file(out.join(entries[1]["file"].as_str().unwrap())).unwrap();
    std::fs::write(out.join(".wmvae-leftover.tmp"), b"half").unwrap();
    let stderr = ok(series(data, out, &["--version", "1"]));
    assert!(stderr.contains("2 episodes written (309 frames"), "{stderr}");
    assert_eq!(index(out), entries);
    let stderr = ok(series(data, out, &["--version", "1"]));
    assert!(stderr.contains("0 episodes written (0 frames"), "{stderr}");

    let refused = series(data, out, &["--version", "active"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("holds the series of v1"),
        "{stderr}"
    );
    let unknown = series(data, &data.join("none"), &["--version", "9"]);
    assert_eq!(
        unknown.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );

    let active = data.join("active");
    ok(series(
        data,
        &active,
        &["--version", "active", "--source", "car", "--episodes", "e..f"],
    ));
    let chosen = index(&active);
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0]["episode"], "e1");
    let arrays = read_npz(&active.join(chosen[0]["file"].as_str().unwrap()));
    assert_eq!(arrays["version"].2, 2i64.to_le_bytes());
}

/// The Python reader accepts the directory, and the MDN-RNN example trains on it.
fn python_reads_it(out: &Path) {
    let python = venv_python();
    let check = "import sys, wmvae; e = list(wmvae.read_series(sys.argv[1])); \
                 assert [x['frames'] for x in e] == [20, 9, 300], e; \
                 assert {x['version'] for x in e} == {1}; print('ok')";
    let run = std::process::Command::new(&python)
        .args(["-c", check])
        .arg(out)
        .env("PYTHONPATH", repo_root().join("python"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mdn = std::process::Command::new(&python)
        .arg(repo_root().join("examples/train_mdn_rnn.py"))
        .arg("--series")
        .arg(out)
        .args(["--steps", "3", "--batch-size", "4", "--seq-len", "50", "--threads", "1"])
        .env("PYTHONPATH", repo_root().join("python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&mdn.stdout);
    assert!(
        mdn.status.success() && stdout.contains("step 3 loss"),
        "{stdout}{}",
        String::from_utf8_lossy(&mdn.stderr)
    );
}

fn mu_of_encode(args: &[&str], pixels: &[u8], dir: &Path) -> Vec<f32> {
    wmvae::frames::npy::write_frames(&dir.join("in.npy"), pixels, 64, 64).unwrap();
    ok(wmvae()
        .args(["encode", "--device", "cpu", "--input"])
        .arg(dir.join("in.npy"))
        .arg("--output")
        .arg(dir.join("out.npz"))
        .args(args)
        .output()
        .unwrap());
    f32s(&read_npz(&dir.join("out.npz"))["mu"].2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_online_through_the_leading_trainer() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let _daemon = Daemon::start(&nats.url, dir.path(), FAST);
    let js = async_nats::jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    let pixels = frames(80, 64, 64);
    for (i, px) in pixels.chunks(12288).enumerate() {
        let (episode, step) = if i < 60 { ("e0", i) } else { ("a/b c", i - 60) };
        let message = wmvae::frames::wire::FrameMessage::rgb(episode, step as u64, 64, 64, px.to_vec())
            .with_transition(vec![0.5, i as f32], 1.0, false);
        js.publish("wm.frames.car", message.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let client = nats.client().await;
    wait_until(Duration::from_secs(120), "version 1 and 80 frames", || async {
        let Ok(reply) = client.request("wm.ctl.status", "".into()).await else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&reply.payload)
            .is_ok_and(|s| s["active_version"].as_u64() >= Some(1) && s["buffer_frames"] == 80)
    })
    .await;

    // No --online: the daemon answers, so its trainer encodes (it holds the store).
    let out = dir.path().join("series");
    let stderr = ok(wmvae()
        .args(["series", "--version", "1", "--nats-url", &nats.url, "--out"])
        .arg(&out)
        .arg("--data-dir")
        .arg(dir.path().join("store"))
        .output()
        .unwrap());
    assert!(stderr.contains("2 episodes written (80 frames"), "{stderr}");
    let entries = index(&out);
    let names: Vec<_> = entries
        .iter()
        .map(|e| (e["episode"].as_str().unwrap(), e["frames"].as_u64().unwrap()))
        .collect();
    assert_eq!(names, [("a/b c", 20), ("e0", 60)]);
    let e0 = read_npz(&out.join(entries[1]["file"].as_str().unwrap()));
    assert_eq!(
        (e0["action"].1.clone(), e0["version"].2.clone()),
        (vec![60, 2], 1i64.to_le_bytes().to_vec())
    );
    let url = nats.url.clone();
    let expected = mu_of_encode(
        &["--checkpoint", "1", "--online", "--nats-url", &url],
        &pixels[..60 * 12288],
        dir.path(),
    );
    let diff = expected
        .iter()
        .zip(f32s(&e0["mu"].2))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-5, "online series mu differs from encode's by {diff}");
}
