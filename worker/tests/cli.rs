//! The `kiln-worker` binary as a user runs it: answers on stdout only, llama.cpp's tokens
//! end to end, and one-line errors with exit code 1 for bad input.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn kiln() -> Command {
    // Resolve (and if needed fetch) the models before any binary runs.
    common::model("smollm2");
    common::model("gemma3");
    Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
}

fn run(args: &[&str]) -> Output {
    kiln().args(args).output().expect("kiln-worker runs")
}

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    kiln().args(args).envs(env.iter().copied()).output().expect("kiln-worker runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn raw_completion_prints_llama_cpp_tokens_as_text() {
    let g = common::golden("smollm2");
    let case = &g["greedy"][0];
    let expected = common::model("smollm2").tokenizer.decode(&common::ids(&case["generated"]), false);
    let out = run(&["run", "-m", "smollm2", "--raw", "-i", case["prompt"].as_str().unwrap(), "-n", "32", "--temperature", "0", "--ignore-eos"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{expected}\n"));
}

fn one_shot_chat_prints_only_the_answer(name: &str) {
    let g = common::golden(name);
    let chat = &g["chat"];
    let expected = common::model(name).tokenizer.decode(&common::ids(&chat["answer"]), false);
    let out = run(&["run", "-m", name, "-i", chat["question"].as_str().unwrap(), "-n", "24", "--temperature", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{expected}\n"));
}

#[test]
fn smollm2_one_shot_chat_matches_llama_cpp() {
    one_shot_chat_prints_only_the_answer("smollm2");
}

#[test]
fn gemma3_one_shot_chat_matches_llama_cpp() {
    one_shot_chat_prints_only_the_answer("gemma3");
}

#[test]
fn interactive_chat_reads_turns_and_commands_from_stdin() {
    let mut child = kiln()
        .args(["run", "-m", "smollm2", "--temperature", "0", "-n", "12", "--system", "Answer in one word."])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is the capital of France?\n/clear\n/help\nSay hi\n/exit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Paris"), "{stdout:?}");
    assert_eq!(stdout.lines().filter(|l| !l.is_empty()).count(), 2, "two answers: {stdout:?}");
    assert!(text(&out.stderr).contains("conversation cleared"));
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = run(&["run", "-m", "/no/such/model.gguf", "-i", "x"]);
    assert_one_line_error(&out, "/no/such/model.gguf");
    let out = run(&["run", "-m", "no-such-model", "-i", "x"]);
    assert_one_line_error(&out, "known: smollm2, gemma3");

    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, b"just some text").unwrap();
    assert_one_line_error(&run(&["run", "-m", not_gguf.to_str().unwrap(), "-i", "x"]), "not a GGUF file");

    let src = std::fs::read(&common::model("smollm2").path).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &src[..src.len() / 2]).unwrap();
    assert_one_line_error(&run(&["run", "-m", truncated.to_str().unwrap(), "-i", "x"]), "truncated");

    let mut w = common::tiny::writer();
    w.set("general.architecture", kiln_worker::formats::gguf_value::Value::String("rwkv7".into()));
    let odd = dir.join("odd.gguf");
    std::fs::write(&odd, w.to_bytes()).unwrap();
    assert_one_line_error(&run(&["run", "-m", odd.to_str().unwrap(), "-i", "x"]), "unsupported architecture `rwkv7`");

    assert_one_line_error(&run(&["run", "-m", "smollm2", "-i", "x", "--top-p", "2"]), "top_p");
    let long = "word ".repeat(300);
    assert_one_line_error(&run(&["run", "-m", "smollm2", "--raw", "-i", &long, "-c", "64"]), "context holds 64");

    // A build without CUDA asked for a GPU, and devices that do not exist.
    assert_one_line_error(&run(&["run", "-m", "smollm2", "-i", "x", "--device", "cuda"]), "--device cuda:0: this worker was built without CUDA support");
    assert_one_line_error(&run(&["bench", "-m", "smollm2", "--device", "cuda:1"]), "--device cuda:1: this worker was built without CUDA support");
    let out = run(&["run", "-m", "smollm2", "-i", "x", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(text(&out.stderr).contains("unknown device `tpu`: expected cpu, cuda, cuda:N or candle-cpu"), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_reports_the_same_answers_on_candle_as_on_the_cpu() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = dir.join("cases.json");
    std::fs::write(&cases, r#"{"score": [[5, 9, 30, 41, 7, 300, 12]], "greedy": [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57]], "max_tokens": 8}"#).unwrap();
    let model = common::hf_fixture("llama");
    let eval = |device: &str| -> serde_json::Value {
        let out = run(&["eval", "-m", model.to_str().unwrap(), "--input", cases.to_str().unwrap(), "--device", device]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str(&text(&out.stdout)).unwrap()
    };
    let (cpu, candle) = (eval("cpu"), eval("candle-cpu"));
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(candle["device"], "candle-cpu");
    assert_eq!(cpu["score"][0]["top_ids"].as_array().unwrap().len(), 7);
    assert_eq!(cpu["score"][0]["top_ids"], candle["score"][0]["top_ids"]);
    for run in [&cpu, &candle] {
        let alone = &run["greedy_alone"];
        assert_eq!(alone.as_array().unwrap().len(), 2);
        assert_eq!(alone[0].as_array().unwrap().len(), 8);
        for other in ["greedy_batched", "greedy_cached", "greedy_preempted"] {
            assert_eq!(&run[other], alone, "{other} on {}", run["device"]);
        }
        assert!(run["prefix_hit_tokens"].as_u64().unwrap() > 0, "{}", run["device"]);
        // The engine's prompt log-probabilities equal teacher forcing on either device.
        assert!(run["prompt_logprob_gap"].as_f64().unwrap() <= 1e-5, "{}: {}", run["device"], run["prompt_logprob_gap"]);
    }
    assert_eq!(cpu["greedy_alone"], candle["greedy_alone"]);
    // The GPU backend's attention composed of candle operations (the cross-check for its
    // kernels) against the kernels' path: the same tokens, logits within 1e-5.
    let composed = run_with_env(&["eval", "-m", model.to_str().unwrap(), "--input", cases.to_str().unwrap(), "--device", "candle-cpu"], &[("KILN_CANDLE_ATTENTION", "composed")]);
    assert!(composed.status.success(), "{}", text(&composed.stderr));
    let composed: serde_json::Value = serde_json::from_str(&text(&composed.stdout)).unwrap();
    assert_eq!(composed["score"][0]["top_ids"], candle["score"][0]["top_ids"]);
    assert_eq!(composed["greedy_alone"], candle["greedy_alone"]);
    assert_eq!(composed["greedy_preempted"], candle["greedy_alone"]);
    let logits = |v: &serde_json::Value| -> Vec<f64> { v["score"][0]["top_logits"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap())).collect() };
    let gap = logits(&composed).iter().zip(logits(&candle)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(gap <= 1e-5, "composed and kernel attention differ by {gap}");
    let out = run_with_env(&["eval", "-m", model.to_str().unwrap(), "--input", cases.to_str().unwrap(), "--device", "candle-cpu"], &[("KILN_CANDLE_ATTENTION", "flash")]);
    assert_one_line_error(&out, "KILN_CANDLE_ATTENTION=flash: expected `kernels` or `composed`");
    let out = run(&["eval", "-m", model.to_str().unwrap(), "--input", model.join("config.json").to_str().unwrap()]);
    assert_one_line_error(&out, "expected {\"score\"");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn constrained_answers_follow_their_grammar() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-grammar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = run(&["run", "-m", "smollm2", "-i", "When did people land on the moon?", "--regex", "[0-9]{4}", "--temperature", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let year = text(&out.stdout);
    assert!(year.trim_end().len() == 4 && year.trim_end().bytes().all(|b| b.is_ascii_digit()), "{year:?}");

    let schema = dir.join("city.json");
    std::fs::write(&schema, r#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "rank": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["city", "rank"], "additionalProperties": false}"#).unwrap();
    let out = run(&["run", "-m", "smollm2", "-i", "Name a big city.", "--json-schema", schema.to_str().unwrap(), "--temperature", "1", "--seed", "5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim_end()).expect("JSON");
    assert!(v["city"].is_string() && (1..=9).contains(&v["rank"].as_i64().unwrap()), "{v}");

    let lark = dir.join("yes-no.lark");
    std::fs::write(&lark, "start: (\"yes\" | \"no\") \".\"\n").unwrap();
    let out = run(&["run", "-m", "smollm2", "-i", "Is water wet?", "--grammar", lark.to_str().unwrap()]);
    assert!(["yes.\n", "no.\n"].contains(&text(&out.stdout).as_str()), "{:?}", text(&out.stdout));

    assert_one_line_error(&run(&["run", "-m", "smollm2", "-i", "x", "--regex", "[a-"]), "invalid regular expression");
    assert_one_line_error(&run(&["run", "-m", "smollm2", "-i", "x", "--json-schema", "/no/such.json"]), "cannot read /no/such.json");
    std::fs::write(&schema, r#"{"type": "array", "uniqueItems": true}"#).unwrap();
    assert_one_line_error(&run(&["run", "-m", "smollm2", "-i", "x", "--json-schema", schema.to_str().unwrap()]), "uniqueItems");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_json_uses_llama_bench_keys() {
    let out = run(&["bench", "-m", "smollm2", "-p", "16", "-n", "4", "-r", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tests = v.as_array().unwrap();
    assert_eq!(tests.len(), 2);
    assert_eq!((tests[0]["n_prompt"].as_u64(), tests[0]["n_gen"].as_u64()), (Some(16), Some(0)));
    assert_eq!((tests[1]["n_prompt"].as_u64(), tests[1]["n_gen"].as_u64()), (Some(0), Some(4)));
    for t in tests {
        assert!(t["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(t["stddev_ts"].as_f64().unwrap() >= 0.0);
        assert_eq!(t["samples_ts"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn concurrency_bench_reports_aggregate_decode_per_level() {
    let out = run(&["bench", "-m", "smollm2", "--concurrency", "1,3", "-p", "8", "-n", "6", "-r", "1", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels: Vec<u64> = v.as_array().unwrap().iter().map(|t| t["n_parallel"].as_u64().unwrap()).collect();
    assert_eq!(levels, [1, 3]);
    for t in v.as_array().unwrap() {
        assert_eq!((t["n_prompt"].as_u64(), t["n_gen"].as_u64()), (Some(8), Some(6)));
        assert!(t["avg_ts"].as_f64().unwrap() > 0.0 && t["ttft_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn pull_prints_the_path_of_a_verified_model() {
    let out = run(&["pull", "smollm2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = text(&out.stdout).trim().to_string();
    assert!(path.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{path}");
    assert_eq!(
        kiln_worker::assets::sha256_file(std::path::Path::new(&path)).unwrap(),
        kiln_worker::assets::known("smollm2").unwrap().sha256
    );
}

/// Fetches both models into an empty KILN_HOME, as on a fresh machine (slow: `make test-full`).
#[test]
#[ignore]
fn pull_into_an_empty_home_fetches_and_verifies() {
    let home = std::env::temp_dir().join(format!("kiln-home-{}", std::process::id()));
    for name in ["smollm2", "gemma3"] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-worker")).args(["pull", name]).env("KILN_HOME", &home).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let path = text(&out.stdout).trim().to_string();
        assert!(path.starts_with(home.to_str().unwrap()), "only the path goes to stdout: {path:?}");
        assert!(text(&out.stderr).contains("sha256 verified"));
        let m = kiln_worker::assets::known(name).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), m.size_bytes);
    }
    std::fs::remove_dir_all(&home).ok();
}

#[test]
fn embed_mode_prints_sentence_transformers_vectors() {
    let d = kiln_worker::assets_dir::known_directory("minilm").unwrap();
    kiln_worker::assets_dir::pull_directory(d, &mut |_| {}).unwrap();
    let golden = common::golden("minilm_embeddings");
    let cases = golden["cases"].as_array().unwrap();
    // One input with -i; two from standard input, one vector per line.
    let out = run(&["run", "-m", "minilm", "--embed", "-i", cases[0]["text"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut child = kiln().args(["run", "-m", "minilm", "--embed"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = format!("{}\n{}\n", cases[1]["text"].as_str().unwrap(), cases[2]["text"].as_str().unwrap());
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success(), "{}", text(&piped.stderr));
    let printed: Vec<String> = text(&out.stdout).lines().chain(text(&piped.stdout).lines()).map(str::to_string).collect();
    assert_eq!(printed.len(), 3);
    for (line, case) in printed.iter().zip(cases) {
        let got: Vec<f64> = serde_json::from_str(line).unwrap();
        let want: Vec<f64> = case["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), 384);
        let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
        assert!(dot >= 0.9999, "{}: cosine {dot}", case["text"]);
    }
    // Generating with an embedding model, and a text past its inputs, are one-line errors.
    assert_one_line_error(&run(&["run", "-m", "minilm", "-i", "Hi"]), "holds an embedding model");
    assert_one_line_error(&run(&["run", "-m", "minilm", "--embed", "-i", &"word ".repeat(300)]), "302 tokens");
    let cut = run(&["run", "-m", "minilm", "--embed", "--truncate", "-i", &"word ".repeat(300)]);
    assert!(cut.status.success(), "{}", text(&cut.stderr));
}
