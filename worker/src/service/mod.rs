//! The worker daemon's network side: the gRPC service routers talk to, and an HTTP endpoint
//! for Prometheus.

mod convert;
pub mod grpc;
pub mod metrics;

pub use grpc::{ModelSlot, Serving, WorkerService};
