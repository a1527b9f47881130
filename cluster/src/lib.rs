//! kiln's cluster state, kept in etcd: which workers are alive and what they serve
//! (registered under leases, so a dead worker disappears by itself), which models operators
//! want placed where, and which workers are being drained. Workers register and follow
//! placement; routers and `kilnctl` read the same records. The layout is in `docs/cluster.md`.

pub mod etcd;
pub mod placement;
pub mod registration;
pub mod schema;
pub mod view;

pub use etcd::{ClusterError, EtcdConfig};
pub use schema::{DrainMark, GroupRole, Keys, LoadSummary, ModelPhase, ModelStatus, Placement, Snapshot, WorkerRecord, SCHEMA_VERSION};
pub use view::{ClusterView, EtcdHealth};
