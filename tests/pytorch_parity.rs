//! wmvae and PyTorch 2.11 (the venv's) agree: same weights and frames give
//! the same mu, logvar and reconstruction; each loads the other's files; our
//! CarRacing preprocessing matches PIL's.

mod common;

use common::{frames, torch_reference};
use tch::{Device, Tensor};
use wmvae::vae::learner::{frames_to_tensor, Network};
use wmvae::vae::model::VaeConfig;
use wmvae::frames::{npy, preprocess};
use wmvae::vae::weights;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn npz(path: &std::path::Path) -> Vec<(String, Tensor)> {
    Tensor::read_npz(path).unwrap()
}

fn get(named: &[(String, Tensor)], name: &str) -> Tensor {
    named.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
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
    net.load_safetensors(&std::fs::read(&path).unwrap(), "torch.safetensors").unwrap();
    let ours = weights::from_safetensors_bytes(&net.weights_bytes().unwrap(), "ours").unwrap();
    assert_eq!(ours.len(), 22);
    for ((a, ta), (b, tb)) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
        assert!(ta.equal(tb), "{a} changed on load");
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
    torch_reference(&["resize", "--frames", frames_path.to_str().unwrap(), "--out", out_path.to_str().unwrap()]);
    let mut pil = npy::FrameReader::open(&out_path).unwrap();
    assert_eq!((pil.count, pil.height, pil.width), (4, 64, 64));
    let pil = pil.read_chunk(4).unwrap();
    let ours: Vec<u8> = raw
        .chunks_exact(96 * 96 * 3)
        .flat_map(|f| preprocess::preprocess(bytes::Bytes::copy_from_slice(f), 96, 96, preprocess::Policy::WorldModels).unwrap())
        .collect();
    let worst = ours.iter().zip(&pil).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(worst <= 2, "max difference to PIL: {worst} levels");
}
