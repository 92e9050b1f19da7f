//! libtorch_cuda is not linked but loaded at run time where a driver is
//! (`vae::device`). Until a GPU machine runs `scripts/gpu-check`, this
//! guards the path on the CPU: loaded by hand, the library registers the
//! CUDA backend, so a CUDA tensor fails for want of a driver, not of a
//! backend; and `device = "cuda"` without a driver stays a clear error.

use tch::{Device, Kind, Tensor};
use wmvae::vae::device::{self, DeviceChoice};

fn cuda_tensor() -> Result<Tensor, String> {
    Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))).map_err(|e| e.to_string())
}

#[test]
fn the_cuda_backend_is_loaded_at_run_time() {
    let libtorch_cuda = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/libtorch/lib/libtorch_cuda.so");
    assert!(
        libtorch_cuda.exists(),
        "{} is missing: the venv's torch is the CUDA build (scripts/setup)",
        libtorch_cuda.display()
    );
    let before = cuda_tensor().expect_err("no CUDA tensor before the backend is loaded: it must not be linked");
    assert!(
        before.contains("'CUDA' backend"),
        "before loading, CUDA is an unregistered backend: {before}"
    );

    device::load_cuda_backend().expect("libtorch_cuda.so loads through the binary's rpath");
    if device::nvidia_driver_present() {
        let _on_gpu = cuda_tensor().expect("with a driver, a CUDA tensor once the backend is loaded");
        assert_eq!(DeviceChoice::Cuda.resolve().unwrap(), Device::Cuda(0));
    } else {
        let after = cuda_tensor().expect_err("no CUDA tensor without a driver");
        assert!(
            after.contains("NVIDIA driver"),
            "loaded, CUDA fails for want of a driver only: {after}"
        );
        let err = DeviceChoice::Cuda.resolve().unwrap_err().to_string();
        assert!(
            err.contains("no NVIDIA driver") && err.contains("cuda available: false"),
            "{err}"
        );
        assert_eq!(DeviceChoice::Auto.resolve().unwrap(), Device::Cpu);
    }
}
