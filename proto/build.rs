//! Compiles kiln.proto with protox (pure Rust), so building needs no protoc installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=kiln/v1/kiln.proto");
    let descriptors = protox::compile(["kiln/v1/kiln.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
