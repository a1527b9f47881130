//! `-m ORG/NAME` downloads a model through the Hugging Face hub protocol (hf-hub crate),
//! here from a local HTTP server that serves a tiny fixture in the hub's URL layout:
//! HF_ENDPOINT, HF_HOME and HF_TOKEN are honoured, the files land in the standard cache
//! layout, the model runs, and a second run needs no network.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

const REPO: &str = "kiln-test/tiny-qwen2";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct Seen {
    authorization: Vec<String>,
    paths: Vec<String>,
}

fn respond(mut stream: TcpStream, files: &HashMap<String, Vec<u8>>, seen: &Mutex<Seen>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
    {
        let mut s = seen.lock().unwrap();
        s.paths.push(path.clone());
        s.authorization.extend(headers.get("authorization").cloned());
    }
    let info = format!("/api/models/{REPO}/revision/main");
    let (status, extra, body): (&str, Vec<String>, Vec<u8>) = if path == info {
        let siblings: Vec<String> = files.keys().map(|f| format!("{{\"rfilename\": \"{f}\"}}")).collect();
        ("200 OK", vec![], format!("{{\"id\": \"{REPO}\", \"sha\": \"{COMMIT}\", \"siblings\": [{}]}}", siblings.join(",")).into_bytes())
    } else if let Some(file) = path.strip_prefix(&format!("/{REPO}/resolve/main/")).and_then(|f| files.get(f)) {
        let common = vec![format!("x-repo-commit: {COMMIT}"), format!("etag: \"{:x}\"", file.len() * 7919 + file.first().copied().unwrap_or(0) as usize)];
        match headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
            Some((from, to)) => {
                let from: usize = from.parse().unwrap_or(0);
                let to: usize = to.parse().map(|t: usize| t + 1).unwrap_or(file.len()).min(file.len());
                let mut h = common;
                h.push(format!("content-range: bytes {from}-{}/{}", to.saturating_sub(1), file.len()));
                ("206 Partial Content", h, file[from.min(to)..to].to_vec())
            }
            None => ("200 OK", common, file.clone()),
        }
    } else {
        ("404 Not Found", vec![], b"not found".to_vec())
    };
    let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
    for h in extra {
        head.push_str(&h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
}

/// Serves the fixture directory as `REPO`; returns the endpoint and what requests carried.
fn serve(dir: &Path) -> (String, Arc<Mutex<Seen>>) {
    let mut files = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "reference.json" {
            files.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    let files = Arc::new(files);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let s = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (files, seen) = (Arc::clone(&files), Arc::clone(&s));
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(std::time::Duration::from_millis(200))).ok();
                respond(stream, &files, &seen);
            });
        }
    });
    (endpoint, seen)
}

fn run(home: &Path, endpoint: &str, prompt: &str, n: usize) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
        .args(["run", "-m", REPO, "--raw", "--temperature", "0", "--ignore-eos", "-n", &n.to_string(), "-i", prompt])
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", "hf_test_token")
        .output()
        .unwrap()
}

#[test]
fn a_repo_id_downloads_into_the_hub_cache_and_runs() {
    let fixture = common::hf_fixture("qwen2");
    let reference = common::hf_reference("qwen2");
    let greedy = common::ids(&reference["greedy"]);
    let prompt = reference["prompt"].as_str().unwrap();
    let model = kiln_worker::loader::LoadedModel::load(&fixture).unwrap();
    let expected = model.tokenizer.decode(&greedy, false);

    let home = std::env::temp_dir().join(format!("kiln-hf-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let (endpoint, seen) = serve(&fixture);
    let out = run(&home, &endpoint, prompt, greedy.len());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), expected);

    let snapshot = home.join("hub/models--kiln-test--tiny-qwen2/snapshots").join(COMMIT);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(snapshot.join(f).exists(), "{f} in the standard cache layout");
    }
    let s = seen.lock().unwrap();
    assert!(!s.authorization.is_empty() && s.authorization.iter().all(|a| a == "Bearer hf_test_token"), "HF_TOKEN is sent: {:?}", s.authorization);
    drop(s);

    // Cached: no network needed (an endpoint nobody listens on).
    let out = run(&home, "http://127.0.0.1:9", prompt, greedy.len());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), expected);

    // A repository that is not there: a specific, one-line error.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
        .args(["run", "-m", "kiln-test/absent", "-i", "hi"])
        .env("HF_HOME", &home)
        .env("HF_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("kiln-test/absent") && err.contains("cannot read the repository"), "{err}");
    std::fs::remove_dir_all(&home).unwrap();
}
