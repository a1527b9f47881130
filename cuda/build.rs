//! Builds the kernels of kernels/attention.cu twice: for the host through the emulation
//! (always; the tests run it), and to PTX with nvcc under the `ptx` feature, for the compute
//! capability in CUDA_COMPUTE_CAP (default 90), as candle's kernels are.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    for f in ["kernels/attention.cu", "kernels/emulate.h", "kernels/host.cpp"] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("kernels/host.cpp")
        .include("kernels")
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .compile("kiln_cuda_emulate");

    if std::env::var_os("CARGO_FEATURE_PTX").is_some() {
        println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
        println!("cargo:rerun-if-env-changed=CUDA_HOME");
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
        let nvcc = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("nvcc"));
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("attention.ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&out)
            .arg("kernels/attention.cu")
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}): the `ptx` feature needs nvcc (CUDA_HOME or PATH; scripts/cuda-toolkit.sh installs one)", nvcc.display()));
        assert!(status.success(), "nvcc failed to compile kernels/attention.cu for compute_{cap}");
    }
}
