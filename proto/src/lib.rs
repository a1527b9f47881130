//! kiln's router <-> worker contract, generated from `kiln/v1/kiln.proto`.

pub mod v1 {
    tonic::include_proto!("kiln.v1");
}
