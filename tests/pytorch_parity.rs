//! wmvae and PyTorch 2.11 (the venv's) agree: same weights and frames give
//! the same mu, logvar and reconstruction; each loads the other's files; our
//! Adam takes torch.optim.Adam's steps; our CarRacing preprocessing matches PIL's.

mod common;

use common::{frames, torch_reference};
use tch::{Device, Tensor};
use wmvae::frames::{npy, preprocess};
use wmvae::vae::adam::{Adam, AdamConfig};
use wmvae::vae::learner::{frames_to_tensor, Network};
use wmvae::vae::model::VaeConfig;
use wmvae::vae::weights;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn npz(path: &std::path::Path) -> Vec<(String, Tensor)> {
    Tensor::read_npz(path).unwrap()
}

fn get(named: &[(String, Tensor)], name: &str) -> Tensor {
    named
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
        .shallow_clone()
}

/// Our weights loaded into PyTorch give mu, logvar and decode(mu) within 1e-5 of ours.
#[test]
fn pytorch_reproduces_our_outputs() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(7);
    let net = Network::new(Device::Cpu, VaeConfig::default());
    let weights_path = dir.path().join("w.safetensors");
    std::fs::write(&weights_path, net.weights_bytes().unwrap()).unwrap();
    let raw = frames(8, 64, 64);
    let frames_path = dir.path().join("f.npy");
    npy::write_frames(&frames_path, &raw, 64, 64).unwrap();
    let out_path = dir.path().join("torch.npz");
    torch_reference(&[
        "parity",
        "--weights",
        weights_path.to_str().unwrap(),
        "--frames",
        frames_path.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    let theirs = npz(&out_path);
    let xs = frames_to_tensor(&raw, Device::Cpu).unwrap();
    let (mu, logvar) = net.encode(&xs);
    let recon = net.reconstruct(&xs);
    assert!(max_abs_diff(&mu, &get(&theirs, "mu")) < 1e-5);
    assert!(max_abs_diff(&logvar, &get(&theirs, "logvar")) < 1e-5);
    assert!(max_abs_diff(&recon, &get(&theirs, "recon")) < 1e-5);
}

/// A PyTorch-initialised state_dict saved with safetensors loads into wmvae unchanged.
#[test]
fn we_load_pytorch_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torch.safetensors");
    torch_reference(&["save-weights", "--out", path.to_str().unwrap(), "--seed", "3"]);
    let theirs = weights::read_file(&path).unwrap();
    let mut net = Network::new(Device::Cpu, VaeConfig::default());
    net.load_safetensors(&std::fs::read(&path).unwrap(), "torch.safetensors")
        .unwrap();
    let ours = weights::from_safetensors_bytes(&net.weights_bytes().unwrap(), "ours").unwrap();
    assert_eq!(ours.len(), 22);
    for ((a, ta), (b, tb)) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
        assert!(ta.equal(tb), "{a} changed on load");
    }
}

/// Our Adam, over the whole model's parameters (one flat buffer), moves
/// every weight as torch.optim.Adam does over five steps of given gradients.
#[test]
fn adam_matches_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(11);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    wmvae::vae::model::Vae::new(&vs.root(), VaeConfig::default());
    let (weights_path, grads_path, out_path) = (
        dir.path().join("w.safetensors"),
        dir.path().join("g.safetensors"),
        dir.path().join("o.safetensors"),
    );
    std::fs::write(
        &weights_path,
        weights::to_safetensors_bytes(&weights::named_variables(&vs)).unwrap(),
    )
    .unwrap();
    let grads: Vec<(String, Tensor)> = weights::named_variables(&vs)
        .into_iter()
        .map(|(n, t)| (n, t.randn_like() * 1e-2))
        .collect();
    std::fs::write(&grads_path, weights::to_safetensors_bytes(&grads).unwrap()).unwrap();
    let (steps, lr) = (5, 1e-3);
    let mut adam = Adam::new(
        &vs,
        AdamConfig {
            learning_rate: lr,
            ..Default::default()
        },
    );
    let variables = vs.variables();
    for k in 0..steps {
        let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
        // d/dw sum(w * g c) = g c: the gradient of step k is exactly g c.
        let loss = grads
            .iter()
            .map(|(n, g)| (&variables[n] * (g * (sign * (k + 1) as f64))).sum(tch::Kind::Float))
            .fold(Tensor::from(0f32), |a, b| a + b);
        adam.minimize(&loss);
    }
    let k = steps.to_string();
    let lr = lr.to_string();
    let args = [
        "adam",
        "--weights",
        weights_path.to_str().unwrap(),
        "--grads",
        grads_path.to_str().unwrap(),
        "--steps",
        &k,
        "--lr",
        &lr,
        "--out",
        out_path.to_str().unwrap(),
    ];
    torch_reference(&args);
    let theirs = weights::read_file(&out_path).unwrap();
    let before = weights::read_file(&weights_path).unwrap();
    for (name, ours) in &weights::named_variables(&vs) {
        let (want, start) = (get(&theirs, name), get(&before, name));
        assert!(
            max_abs_diff(ours, &want) < 1e-6,
            "{name} differs from torch.optim.Adam by {}",
            max_abs_diff(ours, &want)
        );
        assert!(max_abs_diff(ours, &start) > 1e-4, "{name} did not move");
    }
}

/// 96x96 frames: crop to rows 0..84 and bilinear resize equal PIL's within 2 levels.
#[test]
fn carracing_preprocessing_matches_pil() {
    let dir = tempfile::tempdir().unwrap();
    let raw = frames(4, 96, 96);
    let frames_path = dir.path().join("f96.npy");
    npy::write_frames(&frames_path, &raw, 96, 96).unwrap();
    let out_path = dir.path().join("pil.npy");
    torch_reference(&[
        "resize",
        "--frames",
        frames_path.to_str().unwrap(),
        "--out",
        out_path.to_str().unwrap(),
    ]);
    let mut pil = npy::FrameReader::open(&out_path).unwrap();
    assert_eq!((pil.count, pil.height, pil.width), (4, 64, 64));
    let pil = pil.read_chunk(4).unwrap();
    let ours: Vec<u8> = raw
        .chunks_exact(96 * 96 * 3)
        .flat_map(|f| {
            preprocess::preprocess(
                bytes::Bytes::copy_from_slice(f),
                96,
                96,
                preprocess::Policy::WorldModels,
            )
            .unwrap()
        })
        .collect();
    let worst = ours
        .iter()
        .zip(&pil)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 2, "max difference to PIL: {worst} levels");
}

/// Decoding agrees with PyTorch's decoder on the same weights and latents:
/// floats within 1e-5, and `wmvae decode`'s uint8 frames (a stored version,
/// offline) within one level.
#[test]
fn decoded_frames_match_pytorch() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(11);
    let net = Network::new(Device::Cpu, VaeConfig::default());
    let weights_bytes = net.weights_bytes().unwrap();
    let weights_path = dir.path().join("w.safetensors");
    std::fs::write(&weights_path, &weights_bytes).unwrap();
    let z = wmvae::vae::properties::prior_draws(32);
    let z_path = dir.path().join("z.npz");
    let mut out = npy::NpzWriter::create(&z_path).unwrap();
    out.array("z", "<f4", &[z.len() / 32, 32])
        .unwrap()
        .write_all(&z.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
        .unwrap();
    out.finish().unwrap();
    let theirs_path = dir.path().join("torch.npz");
    torch_reference(&[
        "decode",
        "--weights",
        weights_path.to_str().unwrap(),
        "--latents",
        z_path.to_str().unwrap(),
        "--out",
        theirs_path.to_str().unwrap(),
    ]);
    let theirs = npz(&theirs_path);
    let ours = Tensor::from_slice(&net.decode_floats(&z).unwrap()).view([-1, 64, 64, 3]);
    assert!(max_abs_diff(&ours, &get(&theirs, "floats")) < 1e-5);

    // The CLI, on a store holding these weights as v1.
    let store_dir = dir.path().join("store");
    let config = wmvae::config::Config::load(None).unwrap();
    let store = wmvae::store::Store::open(&store_dir, config.buffer).unwrap();
    wmvae::versions::import(
        &store,
        None,
        &weights_bytes,
        "test",
        &config,
        &wmvae::store::Provenance::operator(wmvae::store::Change::Import, "test", None),
    )
    .unwrap();
    drop(store);
    let frames_path = dir.path().join("frames.npy");
    let grid_path = dir.path().join("grid.png");
    let run = common::wmvae()
        .args(["decode", "--checkpoint", "1", "--offline", "--data-dir"])
        .arg(&store_dir)
        .arg("--input")
        .arg(&z_path)
        .arg("--output")
        .arg(&frames_path)
        .arg("--grid")
        .arg(&grid_path)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mut reader = npy::FrameReader::open(&frames_path).unwrap();
    assert_eq!((reader.count, reader.height, reader.width), (z.len() / 32, 64, 64));
    let decoded = Tensor::from_slice(&reader.read_chunk(reader.count).unwrap())
        .view([-1, 64, 64, 3])
        .to_kind(tch::Kind::Float);
    let reference = get(&theirs, "frames").to_kind(tch::Kind::Float);
    assert!(
        max_abs_diff(&decoded, &reference) <= 1.0,
        "uint8 frames within one level"
    );
    assert!(std::fs::read(&grid_path).unwrap().starts_with(b"\x89PNG"));
}
