//! The router's memory allocator, and its heap figures as metrics.
//!
//! The router is a long-running server whose requests allocate short-lived buffers on many
//! threads. Under glibc's allocator each thread's arena keeps what it freed, so an idle
//! router's resident size wandered by several MiB from one quiet moment to the next; jemalloc
//! with its background thread hands idle pages back, so resident memory follows what is live.

#[cfg(all(target_os = "linux", not(target_env = "musl")))]
mod jemalloc {
    #[global_allocator]
    static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// jemalloc reads its options from this symbol at start. The background thread purges
    /// unused pages while the router is idle (otherwise purging happens only during later
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

type Gauge = (&'static str, &'static str, Vec<(&'static str, String)>, f64);

/// Bytes the router has allocated and live, and the allocator's resident pages.
pub fn gauges() -> Vec<Gauge> {
    #[cfg(all(target_os = "linux", not(target_env = "musl")))]
    if let Some((allocated, resident)) = jemalloc::figures() {
        return vec![
            ("kiln_router_heap_allocated_bytes", "Heap bytes allocated and not yet freed.", vec![], allocated as f64),
            ("kiln_router_heap_resident_bytes", "Bytes of the allocator's pages that are resident.", vec![], resident as f64),
        ];
    }
    vec![]
}
