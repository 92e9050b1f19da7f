//! `wmvae encode` end to end through the binary: it writes what the library
//! computes, and bad inputs fail with a message naming the file and tensor.

mod common;

use common::{frames, wmvae};
use std::path::Path;
use tch::{Device, Tensor};
use wmvae::frames::{npy, preprocess};
use wmvae::vae::learner::{frames_to_tensor, Network};
use wmvae::vae::model::VaeConfig;
use wmvae::vae::weights;

fn encode(weights: &Path, input: &Path, output: &Path) -> std::process::Output {
    wmvae()
        .args(["encode", "--device", "cpu", "--weights"])
        .arg(weights)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap()
}

fn saved_net(dir: &Path) -> (Network, std::path::PathBuf) {
    tch::manual_seed(11);
    let net = Network::new(Device::Cpu, VaeConfig::default());
    let path = dir.join("w.safetensors");
    std::fs::write(&path, net.weights_bytes().unwrap()).unwrap();
    (net, path)
}

/// 96x96 frames in, more than one chunk: mu/logvar equal the library's on preprocessed frames.
#[test]
fn encodes_carracing_frames_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (net, weights_path) = saved_net(dir.path());
    let n = wmvae::tools::encode::ENCODE_CHUNK_FRAMES + 3;
    let raw = frames(n, 96, 96);
    let input = dir.path().join("f.npy");
    npy::write_frames(&input, &raw, 96, 96).unwrap();
    let output = dir.path().join("z.npz");
    let out = encode(&weights_path, &input, &output);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Not a terminal: progress comes as plain lines, ending at 100 %.
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains(&format!("encode: {n}/{n} (100%)")) && !progress.contains('\r'),
        "{progress}"
    );

    let written = Tensor::read_npz(&output).unwrap();
    let mu = &written.iter().find(|(n, _)| n == "mu").unwrap().1;
    let logvar = &written.iter().find(|(n, _)| n == "logvar").unwrap().1;
    assert_eq!(mu.size(), [n as i64, 32]);
    assert_eq!(logvar.size(), [n as i64, 32]);
    assert_eq!(mu.kind(), tch::Kind::Float);
    let pre: Vec<u8> = raw
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
    let (expected_mu, _) = net.encode(&frames_to_tensor(&pre, Device::Cpu).unwrap());
    let diff = (mu - expected_mu).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "mu differs by {diff}");
}

/// Missing tensor, misshapen tensor, corrupt file, wrong dtype, wrong size: clear errors, exit 1.
#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (net, good_weights) = saved_net(dir.path());
    let input = dir.path().join("f.npy");
    npy::write_frames(&input, &frames(2, 64, 64), 64, 64).unwrap();
    let output = dir.path().join("z.npz");
    let check = |weights: &Path, input: &Path, needles: &[&str]| {
        let out = encode(weights, input, &output);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        }
    };

    let mut named = weights::from_safetensors_bytes(&net.weights_bytes().unwrap(), "x").unwrap();
    named.retain(|(n, _)| n != "encoder.fc_mu.weight");
    let missing = dir.path().join("missing.safetensors");
    std::fs::write(&missing, weights::to_safetensors_bytes(&named).unwrap()).unwrap();
    check(&missing, &input, &["missing.safetensors", "encoder.fc_mu.weight"]);

    let mut named = weights::from_safetensors_bytes(&net.weights_bytes().unwrap(), "x").unwrap();
    named[0].1 = Tensor::zeros([2, 2], (tch::Kind::Float, Device::Cpu));
    let misshapen = dir.path().join("misshapen.safetensors");
    std::fs::write(&misshapen, weights::to_safetensors_bytes(&named).unwrap()).unwrap();
    check(
        &misshapen,
        &input,
        &["misshapen.safetensors", &named[0].0, "shape [2, 2]"],
    );

    let corrupt = dir.path().join("corrupt.safetensors");
    let mut bytes = net.weights_bytes().unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&corrupt, bytes).unwrap();
    check(&corrupt, &input, &["corrupt.safetensors", "not a valid safetensors"]);

    let odd = dir.path().join("odd.npy");
    npy::write_frames(&odd, &frames(1, 32, 48), 32, 48).unwrap();
    check(&good_weights, &odd, &["odd.npy", "32x48 unsupported"]);

    let text = dir.path().join("text.npy");
    std::fs::write(&text, "not numpy").unwrap();
    check(&good_weights, &text, &["text.npy", "uint8 (N, H, W, 3)"]);
}
