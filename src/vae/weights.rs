//! Named tensors to and from `.safetensors` bytes, with the checks a file
//! from outside deserves.
//!
//! The layout is PyTorch's `state_dict` (see `model`), float32, so
//! `module.load_state_dict(safetensors.torch.load_file(path))` reads what we
//! write and we read what PyTorch writes. Loading is strict, like PyTorch's
//! default: a missing, unexpected or misshapen tensor is an error that names
//! the file and the tensor. This module knows nothing of checkpoints'
//! metadata or the optimizer (see `checkpoint`).

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Named tensors in name order: the unit every save and load works on.
pub type NamedTensors = Vec<(String, Tensor)>;

fn dtype_of(kind: Kind) -> Result<Dtype> {
    match kind {
        Kind::Float => Ok(Dtype::F32),
        Kind::Int64 => Ok(Dtype::I64),
        other => bail!("tensor kind {other:?} is not stored by wmvae"),
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::I64 => Some(Kind::Int64),
        _ => None,
    }
}

/// Serialises tensors (float32 or int64, any device) to safetensors bytes.
/// Names are written in sorted order, so equal tensors give equal bytes
/// (and equal sha256).
pub fn to_safetensors_bytes(named: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut raw: BTreeMap<&str, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, tensor) in named {
        let dtype = dtype_of(tensor.kind()).with_context(|| format!("tensor {name}"))?;
        let cpu = tensor.to_device(Device::Cpu).contiguous();
        let numel = cpu.numel();
        let mut bytes = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut bytes, numel)
            .with_context(|| format!("copying tensor {name}"))?;
        let shape = cpu.size().iter().map(|&d| d as usize).collect();
        raw.insert(name.as_str(), (dtype, shape, bytes));
    }
    let views = raw
        .iter()
        .map(|(name, (dtype, shape, bytes))| {
            let view = TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| anyhow!("tensor {name}: {e:?}"))?;
            Ok((name.to_string(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views.iter().map(|(n, v)| (n.as_str(), v)), &None)
        .map_err(|e| anyhow!("serialising safetensors: {e:?}"))
}

/// Parses safetensors bytes; `origin` (a file name, "checkpoint v3", ...)
/// goes into every error.
pub fn from_safetensors_bytes(bytes: &[u8], origin: &str) -> Result<NamedTensors> {
    let file =
        SafeTensors::deserialize(bytes).map_err(|e| anyhow!("{origin}: not a valid safetensors file ({e:?})"))?;
    let mut named = Vec::new();
    for (name, view) in file.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| anyhow!("{origin}: tensor {name} has dtype {:?}, expected F32", view.dtype()))?;
        let size: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &size, kind)
            .with_context(|| format!("{origin}: tensor {name} is unreadable"))?;
        named.push((name, tensor));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named)
}

/// Reads a `.safetensors` file into named tensors.
pub fn read_file(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    from_safetensors_bytes(&bytes, &path.display().to_string())
}

/// The VarStore's variables in name order, detached.
pub fn named_variables(vs: &VarStore) -> NamedTensors {
    let mut named: NamedTensors = vs.variables().into_iter().map(|(n, t)| (n, t.detach())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Copies `named` into the VarStore. Strict: every variable must be present
/// with its exact shape and float32, and no other tensor may be there.
/// Nothing is copied unless everything checks out.
pub fn load_into(vs: &VarStore, named: &[(String, Tensor)], origin: &str) -> Result<()> {
    let variables = vs.variables();
    let given: BTreeMap<&str, &Tensor> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut expected: Vec<&String> = variables.keys().collect();
    expected.sort();
    for name in &expected {
        let want = variables[*name].size();
        let Some(tensor) = given.get(name.as_str()) else {
            bail!("{origin}: missing tensor {name} (expected shape {want:?})");
        };
        if tensor.size() != want {
            bail!(
                "{origin}: tensor {name} has shape {:?}, expected {want:?}",
                tensor.size()
            );
        }
        if tensor.kind() != Kind::Float {
            bail!(
                "{origin}: tensor {name} has dtype {:?}, expected float32",
                tensor.kind()
            );
        }
    }
    if let Some(extra) = given.keys().find(|n| !variables.contains_key(**n)) {
        bail!("{origin}: unexpected tensor {extra} (not part of the World Models VAE)");
    }
    tch::no_grad(|| {
        for (name, var) in &variables {
            let mut var = var.shallow_clone();
            var.f_copy_(given[name.as_str()])
                .with_context(|| format!("{origin}: copying tensor {name}"))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vae::model::{Vae, VaeConfig};

    fn model(seed: i64) -> VarStore {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        Vae::new(&vs.root(), VaeConfig::default());
        vs
    }

    #[test]
    fn round_trip_is_bit_identical_and_deterministic() {
        let a = model(1);
        let bytes = to_safetensors_bytes(&named_variables(&a)).unwrap();
        assert_eq!(bytes, to_safetensors_bytes(&named_variables(&a)).unwrap());
        let b = model(2);
        load_into(&b, &from_safetensors_bytes(&bytes, "test").unwrap(), "test").unwrap();
        for ((na, ta), (nb, tb)) in named_variables(&a).iter().zip(named_variables(&b).iter()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{na} differs");
        }
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let vs = model(1);
        let mut named = named_variables(&vs);
        named.retain(|(n, _)| n != "decoder.fc.bias");
        let err = load_into(&vs, &named, "w.safetensors").unwrap_err().to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("missing tensor decoder.fc.bias"),
            "{err}"
        );

        let mut named = named_variables(&vs);
        named[0].1 = Tensor::zeros([7], (Kind::Float, Device::Cpu));
        let err = load_into(&vs, &named, "w.safetensors").unwrap_err().to_string();
        assert!(err.contains(&named[0].0) && err.contains("shape [7]"), "{err}");
    }

    #[test]
    fn corrupt_bytes_are_a_clear_error() {
        let err = from_safetensors_bytes(b"definitely not safetensors", "junk.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("junk.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
    }
}
