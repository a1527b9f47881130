//! The worker's gRPC service over a real model: what it streams equals the engine's own
//! output, closing a stream cancels the generation and frees its blocks, and bad requests
//! get InvalidArgument with a specific message, including a grammar that fails only while
//! generating (Internal would make a router retry it elsewhere and count it against workers).

mod common;

use kiln_proto::v1 as pb;
use kiln_proto::v1::worker_client::WorkerClient;
use kiln_proto::v1::worker_server::WorkerServer;
use kiln_shared::sampling::SamplingParams;
use kiln_shared::tokenizer::{Tokenizer, TokenizerSpec};
use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, GenerationRequest};
use kiln_worker::service::WorkerService;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

struct Served {
    client: WorkerClient<Channel>,
    engine: EngineHandle,
}

async fn serve() -> Served {
    let model = common::model("smollm2");
    let cfg = EngineConfig { max_seqs: 4, max_context_len: Some(512), ..EngineConfig::default() };
    let engine = Engine::start(model.clone(), common::compute(), cfg).unwrap();
    let service = WorkerService::new(engine.clone(), model, "smollm2", 4).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
    Served { client, engine }
}

fn request(prompt: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt,
        sampling: Some(pb::SamplingParams { temperature: 0.0, top_p: 1.0, repeat_penalty: 1.0, repeat_last_n: 64, ..Default::default() }),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        n: 1,
        ..Default::default()
    }
}

/// Tokens and text a gRPC stream carried, with its Done event.
async fn drain(mut stream: tonic::Streaming<pb::GenerateEvent>) -> (Vec<u32>, String, pb::DoneEvent) {
    let (mut tokens, mut text) = (vec![], String::new());
    while let Some(e) = stream.message().await.unwrap() {
        match e.event.unwrap() {
            pb::generate_event::Event::Token(t) => {
                tokens.push(t.token);
                text.push_str(&t.text);
            }
            pb::generate_event::Event::Done(d) => {
                text.push_str(&d.tail);
                assert!(stream.message().await.unwrap().is_none(), "events after the last Done");
                return (tokens, text, d);
            }
            pb::generate_event::Event::PromptLogprobs(_) => panic!("prompt log-probabilities were not asked for"),
        }
    }
    panic!("stream ended without Done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_carries_a_tokenizer_that_tokenizes_identically() {
    let mut s = serve().await;
    let info = s.client.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_id, "smollm2");
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.context_length, 512);
    assert_eq!(info.max_seqs, 4);
    assert!(info.chat_template.contains("im_start"));
    let spec: TokenizerSpec = serde_json::from_slice(&info.tokenizer_json).unwrap();
    let remote = Tokenizer::new(spec).unwrap();
    let local = &common::model("smollm2").tokenizer;
    for text in ["Hello world", "<|im_start|>user\nÜnïcödé 1234 tokens!<|im_end|>", "  spaces\n\n\ttabs"] {
        assert_eq!(remote.encode(text, true, true), local.encode(text, true, true), "{text:?}");
    }
    let t = s.client.tokenize(pb::TokenizeRequest { text: "Hello world".into(), add_special: false, parse_special: true }).await.unwrap();
    assert_eq!(t.get_ref().tokens, local.encode("Hello world", false, true));
    let d = s.client.detokenize(pb::DetokenizeRequest { tokens: t.into_inner().tokens, render_special: false }).await.unwrap();
    assert_eq!(d.get_ref().text, "Hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_equal_the_engines_output() {
    let mut s = serve().await;
    let model = common::model("smollm2");
    let prompt = model.tokenizer.encode("The capital of France is", true, true);
    let stream = s.client.generate(request(prompt.clone(), 12)).await.unwrap().into_inner();
    let (tokens, text, done) = drain(stream).await;

    let direct = s
        .engine
        .submit(GenerationRequest { prompt: prompt.clone(), sampling: SamplingParams::greedy(), max_tokens: Some(12), ignore_eos: true, ..Default::default() })
        .unwrap();
    let expected: Vec<u32> = direct.filter_map(|e| if let Event::Token { id, .. } = e { Some(id) } else { None }).collect();
    assert_eq!(tokens, expected);
    assert_eq!(text, model.tokenizer.decode(&tokens, false));
    assert_eq!(done.finish, pb::FinishReason::Length as i32);
    let usage = done.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (prompt.len() as u32, 12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_stream_cancels_and_frees_blocks() {
    let mut s = serve().await;
    let prompt = common::model("smollm2").tokenizer.encode("Once upon a time", true, true);
    let mut stream = s.client.generate(request(prompt, 400)).await.unwrap().into_inner();
    for _ in 0..3 {
        assert!(matches!(stream.message().await.unwrap().and_then(|e| e.event), Some(pb::generate_event::Event::Token(_))));
    }
    drop(stream);
    let mut freed = false;
    for _ in 0..200 {
        let st = s.engine.stats();
        if st.cancelled == 1 && st.scheduler.running == 0 && st.blocks.iter().all(|b| b.in_use == 0) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(freed, "the generation was not cancelled: {:?}", s.engine.stats());
    assert!(s.engine.stats().generated_tokens < 400);
    let load = s.client.load(pb::LoadRequest {}).await.unwrap().into_inner();
    assert_eq!((load.running, load.max_seqs), (0, 4));
    assert!(load.kv.iter().all(|g| g.blocks_in_use == 0 && g.blocks_total > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_come_before_the_first_token_with_their_texts() {
    let mut s = serve().await;
    let model = common::model("smollm2");
    let prompt = model.tokenizer.encode("The capital of France is Paris. The capital of Spain is", false, true);
    let req = pb::GenerateRequest { prompt_logprobs: Some(3), ..request(prompt.clone(), 2) };
    let mut stream = s.client.generate(req).await.unwrap().into_inner();
    let (mut scored, mut tokens) = (Vec::new(), 0);
    while let Some(e) = stream.message().await.unwrap() {
        match e.event.unwrap() {
            pb::generate_event::Event::PromptLogprobs(p) => {
                assert_eq!(tokens, 0, "all before the first token");
                assert_eq!(p.first as usize, scored.len() + 1);
                scored.extend(p.tokens);
            }
            pb::generate_event::Event::Token(_) => tokens += 1,
            pb::generate_event::Event::Done(_) => break,
        }
    }
    assert_eq!((scored.len(), tokens), (prompt.len() - 1, 2));
    for (i, p) in scored.iter().enumerate() {
        assert_eq!(p.top_logprobs.len(), 3);
        assert!(p.logprob <= p.top_logprobs[0].logprob && p.top_logprobs.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        for t in &p.top_logprobs {
            assert_eq!(t.text.as_bytes(), model.tokenizer.token_bytes(t.token, false), "position {}", i + 1);
        }
    }
    // After "The capital of Spain", " is" is the model's most likely next token.
    let last = scored.last().unwrap();
    assert_eq!((last.top_logprobs[0].token, last.top_logprobs[0].logprob), (prompt[prompt.len() - 1], last.logprob));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_with_specific_messages() {
    let mut s = serve().await;
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (request(vec![], 4), "the prompt is empty"),
        (request(vec![1, 999_999], 4), "outside the vocabulary"),
        (request(vec![1; 600], 4), "600"),
        (request(vec![1, 2], 0), "max_tokens"),
        (pb::GenerateRequest { top_logprobs: 50, logprobs: true, ..request(vec![1, 2], 4) }, "top_logprobs"),
        (pb::GenerateRequest { prompt_logprobs: Some(21), ..request(vec![1, 2], 4) }, "prompt_logprobs = 21"),
        (
            pb::GenerateRequest { sampling: Some(pb::SamplingParams { temperature: -1.0, top_p: 1.0, ..Default::default() }), ..request(vec![1, 2], 4) },
            "temperature",
        ),
    ];
    for (req, needle) in cases {
        let Err(err) = s.client.generate(req).await else { panic!("the request must be refused ({needle})") };
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains(needle), "{:?} lacks {needle:?}", err.message());
    }
    // A grammar that compiles but matches no text is refused before it runs; one that fails
    // after its first token ends the stream with InvalidArgument.
    let grammar = |schema: &str| pb::GenerateRequest {
        constraint: Some(pb::Constraint { kind: Some(pb::constraint::Kind::JsonSchema(schema.into())) }),
        ..request(vec![1, 2, 3], 8)
    };
    let Err(err) = s.client.generate(grammar(r##"{"$ref": "#"}"##)).await else { panic!("a grammar matching nothing must be refused") };
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("no output can match it"), "{}", err.message());
    let failing = grammar(r##"{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}"##);
    let status = match s.client.generate(failing).await {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended without the grammar's failure"),
                }
            }
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("constrained decoding failed"), "{}", status.message());
    let err = s.client.detokenize(pb::DetokenizeRequest { tokens: vec![u32::MAX], render_special: false }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The service still serves after refusing.
    let stream = s.client.generate(request(vec![1, 2, 3], 2)).await.unwrap().into_inner();
    assert_eq!(drain(stream).await.0.len(), 2);
}
