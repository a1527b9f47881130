//! The router's heap figures as metrics (the allocator is set up in `kiln_telemetry::heap`).

type Gauge = (&'static str, &'static str, Vec<(&'static str, String)>, f64);

/// Bytes the router has allocated and live, and the allocator's resident pages.
pub fn gauges() -> Vec<Gauge> {
    match kiln_telemetry::heap::figures() {
        Some((allocated, resident)) => vec![
            ("kiln_router_heap_allocated_bytes", "Heap bytes allocated and not yet freed.", vec![], allocated as f64),
            ("kiln_router_heap_resident_bytes", "Bytes of the allocator's pages that are resident.", vec![], resident as f64),
        ],
        None => vec![],
    }
}
