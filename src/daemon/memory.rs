//! Gives the heap that big, short-lived work freed back to the kernel.
//! glibc's malloc keeps freed memory in its per-thread arenas for reuse,
//! and a version's life is a burst of big allocations on several threads
//! (the checkpoint serialised, stored and uploaded; the encoder's fetch,
//! load and warm-up): an idle daemon with v1 loaded held 445 MB resident,
//! 133 MB of it freed but kept (`malloc_stats`, BENCHMARKS.md "Idle
//! memory"). It frees nothing that is in use and decides nothing.

/// Returns the free pages of every malloc arena to the kernel: after a
/// checkpoint is published and after an encoder switched weights. It walks
/// the arenas under their locks (milliseconds): call it off the runtime.
fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes malloc's own locks and only hands back
    // pages no allocation uses; it touches no Rust-owned memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`release_freed`] on the blocking pool, not waited for.
pub(super) fn release_freed_later() {
    tokio::task::spawn_blocking(release_freed);
}
