//! Weights an operator imports (or the object store returns): a
//! safetensors file loaded into the World Models VAE; refused cleanly or
//! loaded, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wmvae::vae::device::Device;
use wmvae::vae::learner::Network;
use wmvae::vae::model::VaeConfig;

thread_local! {
    /// One network for every input: making one takes ~30 ms, and a load
    /// either copies a whole valid file or nothing.
    static NET: std::cell::RefCell<Network> = std::cell::RefCell::new(Network::new(Device::Cpu, VaeConfig::default()));
}

fuzz_target!(|data: &[u8]| {
    NET.with(|net| {
        let _ = net.borrow_mut().load_safetensors(data, "fuzz");
    });
});
