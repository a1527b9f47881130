//! `--device cuda[:N]` on a worker built without CUDA: `make build-cuda` puts the CUDA build,
//! `kiln-worker-cuda`, next to a CPU build of `kiln-worker`. The CUDA build needs the NVIDIA
//! driver and the CUDA libraries to even start, so this CPU build checks for them and hands
//! the command over only when they are there; a machine without a GPU gets a one-line error
//! instead of a loader failure, and `--device cpu` never touches CUDA.

use anyhow::{bail, Context};
use kiln_worker::backend::Device;

/// The CUDA libraries the CUDA build links, and what provides them.
const LIBRARIES: &[(&str, &str)] = &[
    ("libcuda.so.1", "the NVIDIA driver"),
    ("libcudart.so.13", "the CUDA 13 runtime"),
    ("libcublasLt.so.13", "CUDA 13 cuBLASLt"),
    ("libcublas.so.13", "CUDA 13 cuBLAS"),
    ("libcurand.so.10", "CUDA 13 cuRAND"),
];

/// Replaces this process with `kiln-worker-cuda` and the same arguments when `device` is a GPU
/// and this build has no CUDA backend of its own; returns for every other device.
pub fn hand_over(device: &Device) -> anyhow::Result<()> {
    let Device::Cuda(n) = device else { return Ok(()) };
    if cfg!(feature = "cuda") {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let cuda = exe.with_file_name("kiln-worker-cuda");
    if !cuda.is_file() {
        bail!("--device cuda:{n}: this worker was built without CUDA support (`make build-cuda` builds one, into target/cuda/release/)");
    }
    for (name, what) in LIBRARIES {
        // SAFETY: loading a system library runs only its own initializers; nothing of it is
        // called here, and it is unloaded when the handle drops.
        if unsafe { libloading::Library::new(name) }.is_err() {
            if *name == "libcuda.so.1" {
                bail!("--device cuda:{n}: no NVIDIA driver on this machine ({name} not found)");
            }
            bail!("--device cuda:{n}: {name} ({what}) not found: put the lib directory of a CUDA 13 toolkit (or of PyTorch's nvidia packages) on LD_LIBRARY_PATH");
        }
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&cuda).args(std::env::args_os().skip(1)).exec();
    Err(err).with_context(|| format!("starting {}", cuda.display()))
}
