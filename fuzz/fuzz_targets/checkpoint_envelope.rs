//! A checkpoint envelope as the object store or an old store hands it
//! back: decoded and verified; an error is fine, a panic is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wmvae::vae::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(checkpoint) = Checkpoint::from_bytes(data) {
        let _ = checkpoint.verify();
        let _ = checkpoint.to_bytes();
    }
});
