//! Conversions between the gRPC messages and the engine's types, with the checks a request
//! from the network needs.

use crate::constraint::GrammarSpec;
use crate::engine::{Event, Failure, FinishReason, GenerationRequest, Usage};
use crate::error::Error;
use kiln_proto::v1 as pb;
use kiln_shared::tokenizer::Tokenizer;
use tonic::Status;

/// The grammar a request carries, as the engine takes it (compiled later, off the async
/// runtime); malformed JSON Schema text is the caller's mistake.
pub fn grammar_spec(c: &pb::Constraint) -> Result<Option<GrammarSpec>, Status> {
    use pb::constraint::Kind;
    Ok(match &c.kind {
        None => None,
        Some(Kind::JsonObject(_)) => Some(GrammarSpec::JsonObject),
        Some(Kind::JsonSchema(text)) => Some(GrammarSpec::JsonSchema(
            serde_json::from_str(text).map_err(|e| Status::invalid_argument(format!("invalid JSON schema: not JSON ({e})")))?,
        )),
        Some(Kind::Regex(rx)) => Some(GrammarSpec::Regex(rx.clone())),
        Some(Kind::Lark(g)) => Some(GrammarSpec::Lark(g.clone())),
    })
}

pub fn generation_request(r: pb::GenerateRequest) -> Result<GenerationRequest, Status> {
    let sampling = kiln_proto::sampling_params(&r.sampling.unwrap_or_default());
    Ok(GenerationRequest {
        prompt: r.prompt,
        sampling,
        max_tokens: r.max_tokens.map(|m| m as usize),
        stop: r.stop,
        ignore_eos: r.ignore_eos,
        logprobs: r.logprobs,
        top_logprobs: r.top_logprobs as usize,
        n: r.n.max(1) as usize,
        resume: r.resume.map(|x| crate::engine::Resume { index: x.index as usize, tokens: x.tokens }),
        constraint: None,
        // Decoded and prepared by the caller (CPU work, off the async runtime).
        images: Vec::new(),
        prompt_logprobs: r.prompt_logprobs.map(|k| k as usize),
    })
}

/// The gRPC status for an engine or model error: the caller's mistakes are
/// `InvalidArgument` (with the specific message), the rest `Internal`.
pub fn status(e: &Error) -> Status {
    match e {
        Error::InvalidRequest(_) | Error::PromptTooLong { .. } => Status::invalid_argument(e.to_string()),
        Error::Busy(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ContextFull => pb::FinishReason::ContextFull,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens as u32,
        cached_tokens: u.cached_tokens as u32,
        completion_tokens: u.completion_tokens as u32,
        time_to_first_token_ms: u.prefill_ms,
        decode_ms: u.decode_ms,
    }
}

/// Alternatives with the text of each token.
fn top(alternatives: Vec<(u32, f32)>, tokenizer: &Tokenizer) -> Vec<pb::TopLogprob> {
    alternatives
        .into_iter()
        .map(|(t, lp)| pb::TopLogprob { token: t, text: String::from_utf8_lossy(&tokenizer.token_bytes(t, false)).into_owned(), logprob: lp })
        .collect()
}

/// One engine event as a gRPC event; a failure becomes the stream's error status.
pub fn event(e: Event, tokenizer: &Tokenizer) -> Result<pb::GenerateEvent, Status> {
    use pb::generate_event::Event as E;
    Ok(pb::GenerateEvent {
        event: Some(match e {
            Event::Token { index, id, text, logprob, top_logprobs, cached } => E::Token(pb::TokenEvent {
                index: index as u32,
                token: id,
                text,
                logprob,
                top_logprobs: top(top_logprobs, tokenizer),
                cached_tokens: cached.map(|c| c as u32),
            }),
            Event::PromptLogprobs { first, tokens } => E::PromptLogprobs(pb::PromptLogprobsEvent {
                first: first as u32,
                tokens: tokens.into_iter().map(|p| pb::PromptLogprob { logprob: p.logprob, top_logprobs: top(p.top, tokenizer) }).collect(),
            }),
            Event::Done { index, finish, usage: u, tail, stop } => E::Done(pb::DoneEvent {
                index: index as u32,
                finish: finish_reason(finish) as i32,
                usage: Some(usage(&u)),
                tail,
                stop_sequence: stop,
            }),
            // A request's own failure is its error (the router answers it, and neither retries
            // it elsewhere nor counts it against this worker); the worker's is internal.
            Event::Failed(Failure::Request(msg)) => return Err(Status::invalid_argument(msg)),
            Event::Failed(Failure::Worker(msg)) => return Err(Status::internal(msg)),
        }),
    })
}
