//! The daemons' memory allocator, and its heap figures for their metrics.
//!
//! Routers and workers are long-running servers whose requests allocate short-lived buffers
//! on many threads (a worker streams each request from a thread of its own). Under glibc's
//! allocator each thread's arena keeps what it freed, so an idle daemon's resident size
//! wandered by tens of MiB from one quiet moment to the next; jemalloc with its background
//! thread hands idle pages back, so resident memory follows what is live. Linking this
//! crate makes jemalloc the process's allocator.

#[cfg(all(target_os = "linux", not(target_env = "musl")))]
mod jemalloc {
    #[global_allocator]
    static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// jemalloc reads its options from this symbol at start. The background thread purges
    /// unused pages while the daemon is idle (otherwise purging happens only during later
    /// allocations); dirty pages are kept 5 s for reuse by the next burst.
    #[allow(non_upper_case_globals)]
    #[unsafe(export_name = "_rjem_malloc_conf")]
    pub static malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

    pub fn figures() -> Option<(usize, usize)> {
        use tikv_jemalloc_ctl::{epoch, stats};
        // Statistics are snapshots, refreshed when the epoch advances.
        epoch::advance().ok()?;
        Some((stats::allocated::read().ok()?, stats::resident::read().ok()?))
    }
}

/// Heap bytes allocated and live, and the allocator's resident bytes; None where another
/// allocator is in use.
pub fn figures() -> Option<(usize, usize)> {
    #[cfg(all(target_os = "linux", not(target_env = "musl")))]
    return jemalloc::figures();
    #[cfg(not(all(target_os = "linux", not(target_env = "musl"))))]
    None
}
