//! What sled hands back for a frame chunk or an index block (a damaged
//! store): decoded; an error is fine, a panic is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wmvae::store::fuzzing::chunk(data);
    wmvae::store::fuzzing::index_block(data);
});
