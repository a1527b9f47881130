//! Constrained decoding on the real SmolLM2 model: outputs match their regex, JSON schema or
//! Lark grammar at any temperature and seed (n > 1 completions included), constrained and
//! free sequences in one batch leave each other's outputs unchanged, a constrained
//! completion resumes exactly, a token limit inside a value is `length`, bad grammars are
//! refused with the place of the problem, grammars that match no text are refused when
//! compiled, and a grammar that fails while generating fails its request as the request's
//! fault (not the worker's).

mod common;

use kiln_shared::chat::ChatMessage;
use kiln_shared::sampling::SamplingParams;
use kiln_worker::constraint::{GrammarSpec, Grammars};
use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, Failure, FinishReason, GenerationRequest, Resume};
use kiln_worker::loader::LoadedModel;
use serde_json::{json, Value};
use std::sync::Arc;

struct Choice {
    tokens: Vec<u32>,
    text: String,
    finish: FinishReason,
}

fn run(h: &EngineHandle, req: GenerationRequest) -> Vec<Choice> {
    let n = req.n.max(1) + req.resume.as_ref().map_or(0, |r| r.index);
    let mut out: Vec<Choice> = (0..n).map(|_| Choice { tokens: vec![], text: String::new(), finish: FinishReason::Cancelled }).collect();
    for e in h.submit(req).expect("submit") {
        match e {
            Event::Token { index, id, text, .. } => {
                out[index].tokens.push(id);
                out[index].text.push_str(&text);
            }
            Event::Done { index, finish, tail, .. } => {
                out[index].text.push_str(&tail);
                out[index].finish = finish;
            }
            Event::Failed(m) => panic!("request failed: {m}"),
            Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    out
}

fn setup() -> (Arc<LoadedModel>, EngineHandle, Grammars) {
    let model = common::model("smollm2");
    let h = Engine::start(Arc::clone(&model), common::compute(), EngineConfig::default()).unwrap();
    let grammars = Grammars::new(Arc::clone(&model.tokenizer));
    (model, h, grammars)
}

fn chat(model: &LoadedModel, text: &str) -> Vec<u32> {
    model.encode_chat(&[ChatMessage::new("user", text)]).unwrap()
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(seed), ..SamplingParams::default() }
}

#[test]
fn regex_outputs_always_match() {
    let (model, h, grammars) = setup();
    let cases = [
        ("What is today's date?", r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
        ("Give me a phone number.", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"),
        ("Is the sky blue? Answer yes or no.", r"(yes|no)"),
        ("Name three colours.", r"[A-Z][a-z]{1,8}(, [A-Z][a-z]{1,8}){2}\."),
    ];
    for (prompt, rx) in cases {
        let constraint = grammars.compile(&GrammarSpec::Regex(rx.into())).unwrap();
        let full = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
        for seed in 0..4 {
            let req = GenerationRequest { prompt: chat(&model, prompt), sampling: sampled(seed), max_tokens: Some(40), n: 2, constraint: Some(Arc::clone(&constraint)), ..Default::default() };
            for c in run(&h, req) {
                assert_eq!(c.finish, FinishReason::Stop, "{rx} seed {seed}: {:?}", c.text);
                assert!(full.is_match(&c.text), "{rx} seed {seed}: {:?} does not match", c.text);
            }
        }
    }
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": false}
        },
        "required": ["name", "age", "role", "tags", "address"],
        "additionalProperties": false
    })
}

fn check_person(v: &Value) {
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 5, "{v}");
    assert!(o["name"].as_str().is_some_and(|s| s.chars().count() <= 24), "{v}");
    assert!(o["age"].as_i64().is_some_and(|a| (0..=120).contains(&a)), "{v}");
    assert!(["admin", "user", "guest"].contains(&o["role"].as_str().unwrap_or("")), "{v}");
    let tags = o["tags"].as_array().expect("tags");
    assert!((1..=3).contains(&tags.len()) && tags.iter().all(|t| t.as_str().is_some_and(|s| s.chars().count() <= 12)), "{v}");
    let a = o["address"].as_object().expect("address");
    assert_eq!(a.len(), 2, "{v}");
    assert!(a["zip"].as_str().is_some_and(|z| z.len() == 5 && z.bytes().all(|b| b.is_ascii_digit())), "{v}");
}

#[test]
fn json_schema_outputs_parse_and_hold_at_any_temperature() {
    let (model, h, grammars) = setup();
    let constraint = grammars.compile(&GrammarSpec::JsonSchema(person_schema())).unwrap();
    let prompt = chat(&model, "Describe a user of our system as JSON.");
    let mut reqs = vec![GenerationRequest { prompt: prompt.clone(), sampling: SamplingParams::greedy(), max_tokens: Some(200), constraint: Some(Arc::clone(&constraint)), ..Default::default() }];
    for seed in 0..3 {
        reqs.push(GenerationRequest { prompt: prompt.clone(), sampling: sampled(seed), max_tokens: Some(200), n: 3, constraint: Some(Arc::clone(&constraint)), ..Default::default() });
    }
    for req in reqs {
        for c in run(&h, req) {
            assert_eq!(c.finish, FinishReason::Stop, "{:?}", c.text);
            check_person(&serde_json::from_str(&c.text).unwrap_or_else(|e| panic!("{e}: {:?}", c.text)));
        }
    }
    let any = grammars.compile(&GrammarSpec::JsonObject).unwrap();
    let req = GenerationRequest { prompt, sampling: sampled(7), max_tokens: Some(200), constraint: Some(any), ..Default::default() };
    let c = run(&h, req).remove(0);
    assert!(serde_json::from_str::<Value>(&c.text).is_ok_and(|v| v.is_object()), "{:?}", c.text);
}

#[test]
fn lark_grammar_outputs_parse() {
    let (model, h, grammars) = setup();
    let lark = "start: expr\nexpr: term ((\"+\" | \"-\") term)*\nterm: factor ((\"*\" | \"/\") factor)*\nfactor: NUMBER | \"(\" expr \")\"\nNUMBER: /[1-9][0-9]{0,3}/\n";
    let constraint = grammars.compile(&GrammarSpec::Lark(lark.into())).unwrap();
    // The grammar's language: balanced parentheses around numbers joined by operators.
    let shape = regex::Regex::new(r"^[0-9+\-*/()]+$").unwrap();
    for seed in 0..4 {
        let req = GenerationRequest { prompt: chat(&model, "Write an arithmetic expression."), sampling: sampled(seed), max_tokens: Some(30), n: 2, constraint: Some(Arc::clone(&constraint)), ..Default::default() };
        for c in run(&h, req) {
            assert!(shape.is_match(&c.text), "{:?}", c.text);
            let depth = c.text.chars().try_fold(0i32, |d, ch| match ch {
                '(' => Some(d + 1),
                ')' => (d > 0).then(|| d - 1),
                _ => Some(d),
            });
            if c.finish == FinishReason::Stop {
                assert_eq!(depth, Some(0), "{:?}", c.text);
                assert!(!c.text.ends_with(['+', '-', '*', '/', '(']), "{:?}", c.text);
            } else {
                assert_eq!(c.finish, FinishReason::Length);
                assert!(depth.is_some(), "{:?}", c.text);
            }
        }
    }
}

#[test]
fn constrained_and_free_sequences_share_a_batch_without_changing_each_other() {
    let (model, h, grammars) = setup();
    let constraint = grammars.compile(&GrammarSpec::JsonSchema(person_schema())).unwrap();
    let free = |k: usize| GenerationRequest { prompt: chat(&model, &format!("Tell me fact number {k} about owls.")), sampling: SamplingParams::greedy(), max_tokens: Some(40), ignore_eos: true, ..Default::default() };
    let constrained = |k: u64| GenerationRequest { prompt: chat(&model, "Describe a user as JSON."), sampling: sampled(k), max_tokens: Some(200), constraint: Some(Arc::clone(&constraint)), ..Default::default() };
    let alone: Vec<Vec<u32>> = (0..3).map(|k| run(&h, free(k)).remove(0).tokens).chain((0..3).map(|k| run(&h, constrained(k as u64)).remove(0).tokens)).collect();
    let together: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|k| { let (h, r) = (&h, free(k)); s.spawn(move || run(h, r).remove(0).tokens) })
            .chain((0..3).map(|k| { let (h, r) = (&h, constrained(k as u64)); s.spawn(move || run(h, r).remove(0).tokens) }))
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}

#[test]
fn constrained_completion_resumes_exactly() {
    let (model, h, grammars) = setup();
    let constraint = grammars.compile(&GrammarSpec::JsonSchema(person_schema())).unwrap();
    let base = GenerationRequest { prompt: chat(&model, "Describe a user as JSON."), sampling: sampled(11), max_tokens: Some(200), constraint: Some(constraint), ..Default::default() };
    let whole = run(&h, base.clone()).remove(0);
    assert!(whole.tokens.len() > 12);
    for cut in [1, 5, whole.tokens.len() / 2] {
        let resumed = run(&h, GenerationRequest { resume: Some(Resume { index: 0, tokens: whole.tokens[..cut].to_vec() }), ..base.clone() }).remove(0);
        assert_eq!(resumed.tokens, whole.tokens[cut..], "cut at {cut}");
        assert_eq!(resumed.finish, whole.finish);
    }
    // Tokens the grammar could not have produced are refused.
    let outside = model.encode_raw("hello");
    let err = h.submit(GenerationRequest { resume: Some(Resume { index: 0, tokens: outside }), ..base }).err().expect("refused");
    assert!(err.to_string().contains("resumed token 0"), "{err}");
}

#[test]
fn a_token_limit_inside_a_value_ends_with_length() {
    let (model, h, grammars) = setup();
    let schema = json!({"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]});
    let constraint = grammars.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
    let req = GenerationRequest { prompt: chat(&model, "Tell a story as JSON."), sampling: SamplingParams::greedy(), max_tokens: Some(8), constraint: Some(constraint), ..Default::default() };
    let c = run(&h, req).remove(0);
    assert_eq!(c.finish, FinishReason::Length);
    assert!(serde_json::from_str::<Value>(&c.text).is_err(), "an unfinished value: {:?}", c.text);
}

#[test]
fn bad_grammars_are_refused_with_the_place_of_the_problem() {
    let model = common::model("smollm2");
    let grammars = Grammars::new(Arc::clone(&model.tokenizer));
    let cases = [
        (GrammarSpec::JsonSchema(json!({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": true}}})), "uniqueItems", "/properties/tags"),
        (GrammarSpec::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strin"}}})), "strin", "/properties/a"),
        (GrammarSpec::JsonSchema(json!({"$defs": {"d": {"type": "string", "format": "nope"}}, "$ref": "#/$defs/d"})), "nope", "/$defs/d"),
        (GrammarSpec::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})), "minimum", ""),
        (GrammarSpec::JsonSchema(json!({"$ref": "#/$defs/missing"})), "missing", ""),
        (GrammarSpec::Regex("[a-".into()), "regex", ""),
        (GrammarSpec::Lark("start: foo".into()), "foo", ""),
    ];
    for (spec, names, at) in cases {
        let e = grammars.compile(&spec).err().unwrap_or_else(|| panic!("{spec:?} compiled")).to_string();
        assert!(e.contains(names), "{spec:?}: {e}");
        assert!(e.contains(&format!("(at {at})")) || at.is_empty(), "{spec:?}: {e}");
    }
}

#[test]
fn grammars_that_match_no_text_are_refused_when_compiled() {
    let model = common::model("smollm2");
    let grammars = Grammars::new(Arc::clone(&model.tokenizer));
    let cases = [
        GrammarSpec::JsonSchema(json!({"$ref": "#"})),
        GrammarSpec::JsonSchema(json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})),
        GrammarSpec::Lark("start: start".into()),
        GrammarSpec::Regex("[^\\s\\S]".into()),
    ];
    for spec in cases {
        let e = grammars.compile(&spec).err().unwrap_or_else(|| panic!("{spec:?} compiled")).to_string();
        assert!(e.contains("no output can match it"), "{spec:?}: {e}");
        assert!(!e.contains('\n') && !e.contains("<state>"), "{spec:?}: one line without the parser's state: {e}");
    }
    // A grammar that matches only the empty text still compiles (its completions end at once).
    grammars.compile(&GrammarSpec::Regex("a{0}".into())).expect("the empty language's one text");
}

#[test]
fn a_grammar_failing_mid_generation_fails_the_request_as_its_own_fault() {
    let (model, h, grammars) = setup();
    // An object that must contain an object of the same kind: the first token is fine, then
    // the parser exceeds its limits.
    let schema = json!({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]});
    let constraint = grammars.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
    let req = GenerationRequest { prompt: chat(&model, "JSON please."), sampling: SamplingParams::greedy(), max_tokens: Some(8), constraint: Some(constraint), ..Default::default() };
    let failure = h.submit(req).expect("submit").find_map(|e| match e {
        Event::Failed(f) => Some(f),
        _ => None,
    });
    match failure {
        Some(Failure::Request(m)) => assert!(m.contains("constrained decoding failed") && !m.contains("<state>"), "{m}"),
        other => panic!("expected the request's own failure, got {other:?}"),
    }
    // The engine goes on serving.
    let free = GenerationRequest { prompt: chat(&model, "Hi"), sampling: SamplingParams::greedy(), max_tokens: Some(3), ..Default::default() };
    assert_eq!(run(&h, free).remove(0).tokens.len(), 3);
}
