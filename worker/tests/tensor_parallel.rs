//! Tensor parallelism over the TCP backend, with every rank but 0 a real `kiln-worker serve`
//! process on loopback and rank 0 in this test. On every Hugging Face fixture architecture at
//! 2 and 3 ranks, the exact layout gives the whole model's logits bit for bit and the Megatron
//! layout within f32 rounding (only the order of the all-reduce's sums differs); both real
//! GGUF models keep their greedy goldens split; batched equals alone inside a group; a group
//! refuses what it cannot run, and a rank's death fails the next step with its rank named.

mod common;

use kiln_shared::sampling::SamplingParams;
use kiln_worker::engine::{Engine, EngineConfig, Event, GenerationRequest, RequestStream, Session};
use kiln_worker::loader::LoadedModel;
use kiln_worker::parallel::{load_rank, Layout, TpConfig};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest |split − whole| allowed on any logit of an f32 checkpoint in the Megatron layout:
/// the ranks' partial sums are added in another order than one product over all columns, a
/// relative change of a few 2^-24 per layer; logits are a few units. Measured: at most
/// 2.7e-6 (gemma2), so the bound keeps 7x headroom.
const F32_TOLERANCE: f32 = 2e-5;

/// Half-precision checkpoints round activations to f16/bf16 before each product, so a last-bit
/// difference in the residual stream can move a rounded activation by a half-precision step.
/// Measured: 5.6e-5 (llama-f16 over 3 ranks), 0 for bf16.
const HALF_TOLERANCE: f32 = 1e-3;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// Ranks 1.. of a group, as processes; killed if the test ends before they exit.
struct Followers(Vec<Child>);

impl Drop for Followers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Followers {
    fn start(model: &Path, size: usize, leader: &str, ranks: impl Iterator<Item = usize>, timeout_secs: u64, layout: Layout) -> Followers {
        Followers(
            ranks
                .map(|rank| {
                    Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
                        .args(["serve", "--model"])
                        .arg(model)
                        .args(["--threads", "1", "--tp-size", &size.to_string(), "--tp-rank", &rank.to_string(), "--tp-leader", leader, "--tp-group", "test"])
                        .args(["--tp-timeout-secs", &timeout_secs.to_string(), "--tp-layout", layout.name()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("start a follower rank")
                })
                .collect(),
        )
    }

    /// Waits for every follower to exit, returning (success, stderr) of each.
    fn wait(mut self, within: Duration) -> Vec<(bool, String)> {
        let deadline = Instant::now() + within;
        let out = self.0.iter_mut().map(|c| exit_of(c, deadline, "a follower rank did not exit in time after rank 0 closed the group")).map(|(s, e)| (s.success(), e)).collect();
        self.0.clear();
        out
    }
}

/// Waits until `child` exits (failing with `late` after `deadline`): its status and stderr.
fn exit_of(child: &mut Child, deadline: Instant, late: &str) -> (std::process::ExitStatus, String) {
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{late}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err)
}

fn tp(size: usize, leader: &str, timeout_secs: u64, layout: Layout) -> TpConfig {
    TpConfig { rank: 0, size, group: "test".into(), leader: leader.into(), timeout: Duration::from_secs(timeout_secs), layout }
}

/// Rank 0 of a group of `size` over `path`, its followers started as processes.
fn group(path: &Path, size: usize, layout: Layout) -> (Arc<LoadedModel>, Followers) {
    let leader = free_addr();
    let followers = Followers::start(path, size, &leader, 1..size, 60, layout);
    let rank = load_rank(path, None, &tp(size, &leader, 60, layout)).unwrap_or_else(|e| panic!("{}: rank 0 of {size}: {e}", path.display()));
    (Arc::new(rank.model), followers)
}

/// Ends a group: rank 0 lets go of its model, and every follower must exit cleanly.
fn close(model: Arc<LoadedModel>, followers: Followers) {
    drop(model);
    for (ok, err) in followers.wait(Duration::from_secs(20)) {
        assert!(ok && err.contains("rank 0 closed group"), "a follower did not leave cleanly: {err}");
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest { prompt, sampling: SamplingParams::greedy(), max_tokens: Some(max_tokens), ignore_eos: true, ..Default::default() }
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Both layouts at 2 and 3 ranks against the whole model: the exact layout to the bit, the
/// Megatron layout within `tolerance`; the same greedy continuation from both.
fn fixture_matches_the_whole_model(name: &str, tolerance: f32) {
    let dir = common::hf_fixture(name);
    let ids = common::ids(&common::hf_reference(name)["ids"]);
    let whole = Arc::new(LoadedModel::load(&dir).unwrap());
    let mut s = Session::new(Arc::clone(&whole), common::compute(), 256).unwrap();
    let want = s.score(&ids).unwrap();
    let want_tokens = s.generate(&greedy(ids.clone(), 12), &AtomicBool::new(false), |_| {}).unwrap().tokens;
    for layout in [Layout::Exact, Layout::Megatron] {
        for size in [2, 3] {
            let (model, followers) = group(&dir, size, layout);
            let what = format!("{name} over {size} ranks, {} layout", layout.name());
            assert!(model.unused_tensors.is_empty(), "{what}: unused tensors {:?}", model.unused_tensors);
            let mut s = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
            let got = s.score(&ids).unwrap();
            let diff = largest_difference(&want, &got);
            eprintln!("{what}: largest logit difference from the whole model {diff:.2e}");
            match layout {
                Layout::Exact => assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: logits differ from the whole model's by up to {diff:.2e}"),
                Layout::Megatron => assert!(diff <= tolerance, "{what}: a logit differs from the whole model's by {diff:.2e}"),
            }
            let tokens = s.generate(&greedy(ids.clone(), 12), &AtomicBool::new(false), |_| {}).unwrap().tokens;
            assert_eq!(tokens, want_tokens, "{what}: greedy continuation");
            drop(s);
            close(model, followers);
        }
    }
}

#[test]
fn llama_and_mistral_split_over_two_and_three_ranks() {
    fixture_matches_the_whole_model("llama", F32_TOLERANCE);
    fixture_matches_the_whole_model("mistral", F32_TOLERANCE);
    fixture_matches_the_whole_model("llama-wide", F32_TOLERANCE);
}

#[test]
fn qwen_and_phi3_split_over_two_and_three_ranks() {
    fixture_matches_the_whole_model("qwen2", F32_TOLERANCE);
    fixture_matches_the_whole_model("qwen3", F32_TOLERANCE);
    fixture_matches_the_whole_model("phi3", F32_TOLERANCE);
}

#[test]
fn gemma_splits_over_two_and_three_ranks() {
    fixture_matches_the_whole_model("gemma2", F32_TOLERANCE);
    fixture_matches_the_whole_model("gemma2-tied", F32_TOLERANCE);
    fixture_matches_the_whole_model("gemma3", F32_TOLERANCE);
}

#[test]
fn mixtures_of_experts_split_their_experts_over_ranks() {
    fixture_matches_the_whole_model("mixtral", F32_TOLERANCE);
    fixture_matches_the_whole_model("qwen3moe", F32_TOLERANCE);
}

#[test]
fn half_precision_checkpoints_split_over_ranks() {
    fixture_matches_the_whole_model("llama-f16", HALF_TOLERANCE);
    fixture_matches_the_whole_model("qwen3-bf16", HALF_TOLERANCE);
}

/// The greedy goldens of a real model (llama.cpp's tokens, which the whole model reproduces),
/// split in the exact layout.
fn real_model_keeps_its_greedy_tokens(name: &str) {
    let path = kiln_worker::assets::resolve(name, &mut |m| eprintln!("test: {m}")).unwrap();
    let cases = common::golden(name)["greedy"].as_array().unwrap().clone();
    for size in [2, 3] {
        let (model, followers) = group(&path, size, Layout::Exact);
        let mut s = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
        for case in &cases {
            let prompt = common::ids(&case["prompt_ids"]);
            let out = s.generate(&greedy(prompt, 32), &AtomicBool::new(false), |_| {}).unwrap();
            assert_eq!(out.tokens, common::ids(&case["generated"]), "{name} at {size} ranks: greedy continuation of {:?}", case["prompt"]);
        }
        drop(s);
        close(model, followers);
    }
}

#[test]
fn smollm2_keeps_its_greedy_tokens_over_two_and_three_ranks() {
    real_model_keeps_its_greedy_tokens("smollm2");
}

#[test]
fn gemma3_keeps_its_greedy_tokens_over_two_and_three_ranks() {
    real_model_keeps_its_greedy_tokens("gemma3");
}

fn collect(stream: RequestStream) -> Vec<(u32, Option<f32>)> {
    let mut out = Vec::new();
    for e in stream {
        match e {
            Event::Token { id, logprob, .. } => out.push((id, logprob)),
            Event::Done { .. } => return out,
            Event::Failed(msg) => panic!("request failed: {msg}"),
            Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    panic!("stream ended without Done")
}

#[test]
fn batched_equals_alone_inside_a_group_and_forked_completions_share_the_cache() {
    let dir = common::hf_fixture("qwen3");
    let (model, followers) = group(&dir, 2, Layout::Exact);
    let prompts: Vec<Vec<u32>> = (0..4).map(|k| (0..17 + 5 * k).map(|i| ((i * 31 + k * 7) % 300) as u32 + 3).collect()).collect();
    // Teacher-forced logits of one prompt through the group, before the engine takes it.
    let vocab = model.model.config().vocab_size;
    let scored_logits = kiln_worker::engine::Session::new(Arc::clone(&model), common::compute(), 64).unwrap().score(&prompts[3]).unwrap();
    let h = Engine::start(Arc::clone(&model), common::compute(), EngineConfig::default()).unwrap();
    let request = |p: &Vec<u32>| GenerationRequest { logprobs: true, ..greedy(p.clone(), 16) };
    let alone: Vec<_> = prompts.iter().map(|p| collect(h.submit(request(p)).unwrap())).collect();
    let streams: Vec<_> = prompts.iter().map(|p| h.submit(request(p)).unwrap()).collect();
    for (i, (s, a)) in streams.into_iter().zip(&alone).enumerate() {
        // Same tokens and the same log-probabilities to the bit.
        assert_eq!(&collect(s), a, "prompt {i}: batched inside the group differs from alone");
    }
    // Three completions of one prompt: the extra two copy the prompt's partly filled last
    // block on every rank, or their attention would read another rank's stale slots.
    let mut events = h.submit(GenerationRequest { n: 3, ..request(&prompts[1]) }).unwrap();
    let mut by_choice = vec![Vec::new(); 3];
    for e in &mut events {
        match e {
            Event::Token { id, index, logprob, .. } => by_choice[index].push((id, logprob)),
            Event::Done { .. } if by_choice.iter().all(|c| c.len() == 16) => break,
            Event::Done { .. } => {}
            Event::Failed(msg) => panic!("n = 3 failed: {msg}"),
            Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    for (i, c) in by_choice.iter().enumerate() {
        assert_eq!(c, &alone[1], "completion {i} of n = 3 differs from the prompt alone");
    }
    // Prompt log-probabilities: every prompt row's logits gathered from the ranks.
    let mut scored = Vec::new();
    for e in h.submit(GenerationRequest { prompt_logprobs: Some(0), ..greedy(prompts[3].clone(), 2) }).unwrap() {
        match e {
            Event::PromptLogprobs { tokens, .. } => scored.extend(tokens),
            Event::Failed(msg) => panic!("scoring failed: {msg}"),
            _ => {}
        }
    }
    assert_eq!(scored.len(), prompts[3].len() - 1);
    for (pos, (p, row)) in scored.iter().zip(scored_logits.chunks(vocab)).enumerate() {
        let want = kiln_worker::sampler::select::log_prob(row, prompts[3][pos + 1]);
        assert!((p.logprob - want).abs() <= 1e-5, "token {}: {} vs {want}", pos + 1, p.logprob);
    }
    h.shutdown();
    drop(h);
    close(model, followers);
}

fn refused(r: kiln_worker::Result<kiln_worker::parallel::RankModel>, why: &str) -> String {
    match r {
        Ok(_) => panic!("{why}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_group_refuses_what_it_cannot_run() {
    let llama = common::hf_fixture("llama");
    let qwen = common::hf_fixture("qwen3");

    // Five ranks cannot share four heads: every rank says why.
    let leader = free_addr();
    let followers = Followers::start(&llama, 5, &leader, 1..5, 30, Layout::Exact);
    let err = refused(load_rank(&llama, None, &tp(5, &leader, 30, Layout::Exact)), "5 ranks over 4 heads must be refused");
    assert!(err.contains("5 ranks cannot share 4 attention heads"), "{err}");
    for (ok, stderr) in followers.wait(Duration::from_secs(20)) {
        assert!(!ok && stderr.contains("cannot split the model over 5"), "a follower should fail with the reason: {stderr}");
    }

    // A rank that loads another model is refused before anything is loaded.
    let leader = free_addr();
    let followers = Followers::start(&qwen, 2, &leader, 1..2, 30, Layout::Exact);
    let err = refused(load_rank(&llama, None, &tp(2, &leader, 30, Layout::Exact)), "different models must be refused");
    assert!(err.contains("rank 1") && err.contains("loads a different model"), "{err}");
    for (ok, stderr) in followers.wait(Duration::from_secs(20)) {
        assert!(!ok && stderr.contains("refused") && stderr.contains("different model"), "{stderr}");
    }

    // A rank that never comes: rank 0 gives up after its timeout and names it; the rank that
    // did come is told why and exits.
    let leader = free_addr();
    let followers = Followers::start(&llama, 3, &leader, 1..2, 30, Layout::Exact);
    let err = refused(load_rank(&llama, None, &tp(3, &leader, 2, Layout::Exact)), "a missing rank must fail the group");
    assert!(err.contains("rank 2") && err.contains("did not join within 2 s"), "{err}");
    for (ok, stderr) in followers.wait(Duration::from_secs(20)) {
        assert!(!ok && stderr.contains("did not join"), "{stderr}");
    }

    // Rank 0 alone, nobody listening: a follower gives up and says where it looked.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
        .args(["serve", "--model"])
        .arg(&llama)
        .args(["--tp-size", "2", "--tp-rank", "1", "--tp-leader", &free_addr(), "--tp-timeout-secs", "1", "--tp-group", "test"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot reach rank 0"), "{stderr}");

    // Options that make no group.
    for (args, why) in [
        (vec!["--tp-size", "2", "--tp-rank", "2"], "is not a rank of a group of 2"),
        (vec!["--tp-size", "2", "--tp-rank", "1"], "needs --tp-leader"),
        (vec!["--tp-size", "0"], "--tp-size must be at least 1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-worker")).args(["serve", "--model"]).arg(&llama).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{args:?}: {stderr}");
    }
}

#[test]
fn a_rank_that_dies_fails_the_next_step_with_its_rank_named() {
    let dir = common::hf_fixture("llama");
    let ids = common::ids(&common::hf_reference("llama")["ids"]);
    let (model, mut followers) = group(&dir, 3, Layout::Megatron);
    let mut s = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
    s.score(&ids).unwrap();
    followers.0[1].kill().unwrap();
    followers.0[1].wait().unwrap();
    s.reset();
    let err = s.score(&ids).expect_err("a step without rank 2 must fail").to_string();
    // Noticed by the closed connection, not by a timeout ("sent nothing in time").
    assert!(err.contains("rank 2") && err.contains("closed its connection"), "{err}");
    drop(s);
    drop(model);
    // Rank 1 is told by rank 0 closing the group, whatever it was doing.
    let rest = Followers(followers.0.drain(..1).collect());
    for (_, stderr) in rest.wait(Duration::from_secs(20)) {
        assert!(stderr.contains("rank 0"), "{stderr}");
    }
}

#[test]
fn rank_0_started_by_hand_exits_when_a_rank_dies() {
    let dir = common::hf_fixture("llama");
    let (leader, grpc) = (free_addr(), free_addr());
    let mut followers = Followers::start(&dir, 2, &leader, 1..2, 30, Layout::Exact);
    let mut rank0 = Command::new(env!("CARGO_BIN_EXE_kiln-worker"))
        .args(["serve", "--model"])
        .arg(&dir)
        .args(["--grpc", &grpc, "--threads", "1", "--tp-size", "2", "--tp-leader", &leader, "--tp-group", "test"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&grpc).is_err() {
        assert!(Instant::now() < deadline && rank0.try_wait().unwrap().is_none(), "rank 0 never started serving");
        std::thread::sleep(Duration::from_millis(50));
    }
    followers.0[0].kill().unwrap();
    followers.0[0].wait().unwrap();
    let (status, err) = exit_of(&mut rank0, Instant::now() + Duration::from_secs(20), "rank 0 kept running without its group");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("tensor-parallel group failed") && err.contains("rank 1"), "{err}");
}

#[test]
fn a_stopped_rank_fails_the_group_between_steps() {
    let dir = common::hf_fixture("llama");
    let ids = common::ids(&common::hf_reference("llama")["ids"]);
    let (model, followers) = group(&dir, 2, Layout::Exact);
    let mut s = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
    s.score(&ids).unwrap();
    let group = model.group.clone().expect("a split model knows its group");
    group.check_alive().expect("every rank is up");
    let pid = followers.0[0].id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let start = Instant::now();
    let err = loop {
        if let Err(e) = group.check_alive() {
            break e.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(15), "a stopped rank went unnoticed");
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert!(err.contains("rank 1") && err.contains("did not answer"), "{err}");
    // The failure sticks: the next step fails with it, without going to the ranks again.
    s.reset();
    let err = s.score(&ids).expect_err("a step of a failed group must fail").to_string();
    assert!(err.contains("failed earlier") && err.contains("did not answer"), "{err}");
    drop(s);
    drop(group);
    drop(model);
    for (_, stderr) in followers.wait(Duration::from_secs(20)) {
        assert!(stderr.contains("rank 0"), "{stderr}");
    }
}
