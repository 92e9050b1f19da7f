//! A frame message as a rollout worker (or anyone on `wm.frames.>`) sends
//! it: decoded under both preprocessing policies; a rejection is fine, a
//! panic is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wmvae::frames::preprocess::Policy;
use wmvae::frames::wire::decode_frame;

fuzz_target!(|data: &[u8]| {
    let payload = bytes::Bytes::copy_from_slice(data);
    for policy in [Policy::WorldModels, Policy::Resize] {
        if let Ok(frame) = decode_frame("fuzz", &payload, policy) {
            assert_eq!(frame.pixels.len(), wmvae::frames::BYTES);
        }
    }
});
