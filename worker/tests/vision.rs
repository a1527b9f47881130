//! Vision input against transformers: the image processors' pixel values for photographs
//! and odd synthetic images, and tiny random-weight Gemma 3 and Qwen2.5-VL vision-language
//! checkpoints (worker/tests/fixtures/vision, made by scripts/goldens/make_vision_fixtures.py)
//! giving the processor's token ids, the logits of the last 8 prompt positions within 1e-4
//! and the same 16 greedy tokens for prompts with one and with two images of different sizes,
//! alone, batched, in small steps, from the prefix cache and resumed.

mod common;

use kiln_shared::image::ImageLimits;
use kiln_worker::engine::Session;
use kiln_worker::loader::LoadedModel;
use kiln_worker::models::batch::ImageSpan;
use kiln_worker::models::scratch::Scratch;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest |kiln − transformers| allowed on any logit (both in f32).
const LOGIT_TOLERANCE: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vision")
}

fn image_bytes(name: &str) -> Vec<u8> {
    if name == "chelsea_flipped.png" {
        // Another photograph of the same size: the cat mirrored, encoded afresh.
        let img = image::load_from_memory(&image_bytes("chelsea.png")).unwrap().fliph();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        return out.into_inner();
    }
    std::fs::read(fixtures().join("images").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reference_pixels(name: &str, model: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join("images").join(format!("{name}.{model}.f32"))).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn load(name: &str) -> Arc<LoadedModel> {
    let model = LoadedModel::load(&fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(model.unused_tensors.is_empty(), "{name}: unused tensors {:?}", model.unused_tensors);
    Arc::new(model)
}

fn gemma3() -> Arc<LoadedModel> {
    load("gemma3")
}

/// PNG, GIF and lossless WebP decode to the same bytes everywhere, and the resize is
/// Pillow's integer arithmetic: every value equal. JPEG decoders may differ by a step.
const IMAGES: [(&str, bool); 7] = [
    ("chelsea.png", true),
    ("camera.png", true),
    ("gradient_alpha.png", true),
    ("palette.gif", true),
    ("lossless.webp", true),
    ("strip.png", true),
    ("rocket.jpg", false),
];

fn compare_pixels(name: &str, exact: bool, got: &[f32], want: &[f32], std: f32) {
    assert_eq!(got.len(), want.len(), "{name}");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    eprintln!("{name}: largest difference {worst:.2e}");
    if exact {
        assert!(worst == 0.0, "{name}: pixel values differ by up to {worst}");
    } else {
        // One 8-bit step after normalization is 1/255/std; allow a few.
        assert!(worst <= 4.0 / 255.0 / std + 1e-6, "{name}: pixel values differ by up to {worst}");
    }
}

#[test]
fn gemma3_processor_matches_transformers() {
    let model = gemma3();
    let processor = &model.vision.as_ref().expect("a vision model").processor;
    for (name, exact) in IMAGES {
        let got = processor.prepare(&image_bytes(name), &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}")).pixels;
        compare_pixels(name, exact, &got, &reference_pixels(name, "gemma3"), 0.5);
    }
}

/// Qwen2-VL's processor output: the image cut into 14-pixel patches, 2x2 groups of them
/// together, each patch's values channel by channel with the frame repeated for both
/// temporal slices.
fn patchify(pixels: &[f32], height: usize, width: usize) -> Vec<f32> {
    let (ps, m, t) = (14, 2, 2);
    let (gh, gw) = (height / ps, width / ps);
    let mut out = Vec::with_capacity(pixels.len() * t);
    for by in 0..gh / m {
        for bx in 0..gw / m {
            for my in 0..m {
                for mx in 0..m {
                    for c in 0..3 {
                        for _ in 0..t {
                            for ky in 0..ps {
                                let row = c * height * width + ((by * m + my) * ps + ky) * width + (bx * m + mx) * ps;
                                out.extend_from_slice(&pixels[row..row + ps]);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn qwen25vl_processor_matches_transformers() {
    let model = load("qwen25vl");
    let processor = &model.vision.as_ref().expect("a vision model").processor;
    for (name, exact) in IMAGES {
        let img = processor.prepare(&image_bytes(name), &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let grid = std::fs::read_to_string(fixtures().join("images").join(format!("{name}.qwen25vl.grid"))).unwrap();
        let grid: Vec<u32> = grid.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!((img.height / 14, img.width / 14), (grid[1], grid[2]), "{name}: patch grid");
        let got = patchify(&img.pixels, img.height as usize, img.width as usize);
        compare_pixels(name, exact, &got, &reference_pixels(name, "qwen25vl"), 0.2613);
    }
}

/// The reference case's prompt tokens and its images placed in them.
fn prepare(model: &LoadedModel, case: &serde_json::Value) -> (Vec<u32>, Vec<ImageSpan>) {
    let vision = model.vision.as_ref().unwrap();
    let prepared: Vec<Arc<_>> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| Arc::new(vision.processor.prepare(&image_bytes(n.as_str().unwrap()), &ImageLimits::default()).unwrap()))
        .collect();
    let prompt = vision.info.expand(case["prompt"].as_str().unwrap(), &vision.info.counts(&prepared));
    let ids = model.tokenizer.encode(&prompt, false, true);
    assert_eq!(ids, common::ids(&case["ids"]), "{}: prompt token ids", case["name"]);
    let refs: Vec<_> = prepared.iter().map(|p| p.as_ref()).collect();
    let embeddings = vision.encode(&common::compute(), &refs, &mut Scratch::default()).unwrap();
    let mut spans = vision.place(&ids, &prepared).unwrap();
    for (span, e) in spans.iter_mut().zip(embeddings) {
        span.embeddings = Some(e);
    }
    (ids, spans)
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("reference.json")).unwrap()).unwrap()
}

fn logits_and_greedy_tokens_match_transformers(name: &str) {
    let model = load(name);
    let vocab = model.model.config().vocab_size;
    for case in reference(name)["cases"].as_array().unwrap() {
        let label = format!("{name} {}", case["name"].as_str().unwrap());
        let (ids, images) = prepare(&model, case);
        let mut session = Session::new(Arc::clone(&model), common::compute(), 256).unwrap();
        let logits = session.score_with_images(&ids, &images).unwrap();
        let last = case["last_logits"].as_array().unwrap();
        let first_row = ids.len() - last.len();
        let mut worst = (0.0f32, 0, 0);
        for (i, row) in last.iter().enumerate() {
            for (t, want) in row.as_array().unwrap().iter().enumerate() {
                let diff = (logits[(first_row + i) * vocab + t] - want.as_f64().unwrap() as f32).abs();
                if diff > worst.0 {
                    worst = (diff, first_row + i, t);
                }
            }
        }
        eprintln!("{label}: largest logit difference {:.2e} (position {}, token {})", worst.0, worst.1, worst.2);
        assert!(worst.0 <= LOGIT_TOLERANCE, "{label}: logit at position {} token {} differs by {:.2e}", worst.1, worst.2, worst.0);

        // Greedy continuation, each step teacher-forced from scratch as the reference did.
        let mut seq = ids.clone();
        let mut greedy = Vec::new();
        for _ in 0..case["greedy"].as_array().unwrap().len() {
            let logits = session.score_with_images(&seq, &images).unwrap();
            let row = &logits[(seq.len() - 1) * vocab..seq.len() * vocab];
            let next = row.iter().enumerate().fold((0, f32::MIN), |best, (t, &v)| if v > best.1 { (t, v) } else { best }).0 as u32;
            greedy.push(next);
            seq.push(next);
        }
        assert_eq!(greedy, common::ids(&case["greedy"]), "{label}: greedy tokens");
    }
}

#[test]
fn gemma3_logits_and_greedy_tokens_match_transformers() {
    logits_and_greedy_tokens_match_transformers("gemma3");
}

#[test]
fn qwen25vl_logits_and_greedy_tokens_match_transformers() {
    logits_and_greedy_tokens_match_transformers("qwen25vl");
}

mod engine {
    use super::*;
    use kiln_shared::sampling::SamplingParams;
    use kiln_worker::engine::{Engine, EngineConfig, EngineHandle, Event, GenerationRequest, RequestStream, Usage};
    use kiln_worker::vision::PreparedImage;

    fn collect(stream: RequestStream) -> (Vec<u32>, Usage) {
        let mut tokens = Vec::new();
        for e in stream {
            match e {
                Event::Token { id, .. } => tokens.push(id),
                Event::Done { usage, .. } => return (tokens, usage),
                Event::Failed(msg) => panic!("request failed: {msg}"),
                Event::PromptLogprobs { .. } => panic!("prompt log-probabilities were not asked for"),
            }
        }
        panic!("stream ended without Done")
    }

    fn images(model: &str, names: &[&str]) -> Vec<Arc<PreparedImage>> {
        let model = load(model);
        let processor = &model.vision.as_ref().unwrap().processor;
        names.iter().map(|n| Arc::new(processor.prepare(&image_bytes(n), &ImageLimits::default()).unwrap())).collect()
    }

    /// The reference case as a greedy request of its 16 tokens.
    fn request(model: &str, case: &serde_json::Value) -> GenerationRequest {
        let names: Vec<&str> = case["images"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        GenerationRequest {
            prompt: common::ids(&case["ids"]),
            sampling: SamplingParams::greedy(),
            max_tokens: Some(16),
            ignore_eos: true,
            images: images(model, &names),
            ..Default::default()
        }
    }

    fn cases(model: &str) -> Vec<serde_json::Value> {
        reference(model)["cases"].as_array().unwrap().clone()
    }

    fn start(model: &str, cfg: EngineConfig) -> EngineHandle {
        Engine::start(load(model), common::compute(), cfg).unwrap()
    }

    #[test]
    fn alone_batched_and_in_small_chunks_give_transformers_tokens() {
        for model in ["gemma3", "qwen25vl"] {
            alone_batched_and_in_small_chunks(model);
        }
    }

    fn alone_batched_and_in_small_chunks(model: &str) {
        let cases = cases(model);
        // Alone, on the default engine.
        let h = start(model, EngineConfig::default());
        for case in &cases {
            let (tokens, _) = collect(h.submit(request(model, case)).unwrap());
            assert_eq!(tokens, common::ids(&case["greedy"]), "{model} {} alone", case["name"]);
        }
        // Together with text-only requests, steps of 10 tokens (an image is 16: a step may
        // not end inside one, so it stops before or takes all of it), blocks of 4 and a cache
        // small enough to preempt.
        // (The cache holds the longest request with 8 blocks of 4 tokens to spare.)
        let longest = cases.iter().map(|c| c["ids"].as_array().unwrap().len() + 16).max().unwrap();
        let kv_cache_bytes = Some((longest.div_ceil(4) + 8) * 2048);
        let tight = EngineConfig { max_batch_tokens: 10, block_size: 4, kv_cache_bytes, max_seqs: 8, ..EngineConfig::default() };
        let h = start(model, tight);
        let text_only: Vec<GenerationRequest> = (0..5)
            .map(|k| GenerationRequest { prompt: (0..12 + k).map(|i| 10 + ((i * 7 + k) % 200) as u32).collect(), sampling: SamplingParams::greedy(), max_tokens: Some(8), ignore_eos: true, ..Default::default() })
            .collect();
        let alone: Vec<Vec<u32>> = text_only.iter().map(|r| collect(h.submit(r.clone()).unwrap()).0).collect();
        // Whether a burst preempts depends on how far the engine got while it was submitted;
        // bursts repeat (each checked) until one has, a few at most.
        for _ in 0..8 {
            let streams: Vec<RequestStream> = cases.iter().map(|c| request(model, c)).chain(text_only.iter().cloned()).map(|r| h.submit(r).unwrap()).collect();
            let outcomes: Vec<(Vec<u32>, Usage)> = streams.into_iter().map(collect).collect();
            for (case, (tokens, _)) in cases.iter().zip(&outcomes) {
                assert_eq!(tokens, &common::ids(&case["greedy"]), "{model} {} batched", case["name"]);
            }
            for (want, (got, _)) in alone.iter().zip(&outcomes[cases.len()..]) {
                assert_eq!(got, want, "text-only request batched with images");
            }
            if h.stats().scheduler.preemptions > 0 {
                break;
            }
        }
        assert!(h.stats().scheduler.preemptions > 0, "{model}: the tight cache was meant to preempt");
    }

    #[test]
    fn a_repeated_image_hits_the_prefix_cache_and_another_image_does_not() {
        for model in ["gemma3", "qwen25vl"] {
            let case = &cases(model)[0];
            let ids = common::ids(&case["ids"]);
            let image_token = reference(model)["image_token_id"].as_u64().unwrap() as u32;
            let first_image = ids.iter().position(|&t| t == image_token).unwrap();
            let image_end = ids.iter().rposition(|&t| t == image_token).unwrap() + 1;
            let h = start(model, EngineConfig { block_size: 4, ..EngineConfig::default() });
            let (miss, usage) = collect(h.submit(request(model, case)).unwrap());
            assert_eq!(usage.cached_tokens, 0);
            assert_eq!(h.stats().images_encoded, 1, "{model}: the first request encodes its image");
            let (hit, usage) = collect(h.submit(request(model, case)).unwrap());
            assert!(usage.cached_tokens >= image_end, "{model}: cached {} tokens", usage.cached_tokens);
            assert_eq!(hit, miss, "{model}: a prefix-cache hit on the image equals the miss");
            // The cache holds every token of the image, so the encoder did not run again.
            assert_eq!(h.stats().images_encoded, 1, "{model}: an image the prefix cache holds is not encoded again");
            // Same tokens, another image of the same size: nothing from the image on may
            // come from the cache.
            let mut other = request(model, case);
            other.images = images(model, &["chelsea_flipped.png"]);
            let (tokens, usage) = collect(h.submit(other.clone()).unwrap());
            assert!(usage.cached_tokens <= first_image, "{model}: cached {} tokens, but the image starts at {first_image}", usage.cached_tokens);
            assert_eq!(h.stats().images_encoded, 2, "{model}: another image is encoded");
            let fresh = start(model, EngineConfig { block_size: 4, ..EngineConfig::default() });
            assert_eq!(tokens, collect(fresh.submit(other).unwrap()).0, "{model}: another image answered as on a fresh engine");
            assert_ne!(tokens, miss, "{model}: another image should change this model's answer");
        }
    }

    fn case_image_token() -> u32 {
        reference("gemma3")["image_token_id"].as_u64().unwrap() as u32
    }

    #[test]
    fn a_resumed_completion_with_images_continues_as_the_original() {
        // What a router sends another worker when the first died mid-stream: the same
        // request, images included, with the tokens already produced.
        for model in ["gemma3", "qwen25vl"] {
            let h = start(model, EngineConfig::default());
            for case in cases(model).iter().filter(|c| !c["images"].as_array().unwrap().is_empty()) {
                let greedy = common::ids(&case["greedy"]);
                let mut req = request(model, case);
                req.resume = Some(kiln_worker::engine::Resume { index: 0, tokens: greedy[..5].to_vec() });
                let (rest, _) = collect(h.submit(req).unwrap());
                assert_eq!(rest, greedy[5..], "{model} {} resumed after 5 tokens", case["name"]);
            }
        }
    }

    #[test]
    fn image_requests_that_do_not_fit_the_prompt_are_refused() {
        let h = start("gemma3", EngineConfig::default());
        let case = &cases("gemma3")[0];
        let mut two = request("gemma3", case);
        two.images = images("gemma3", &["camera.png", "strip.png"]);
        let err = h.submit(two).err().expect("two images for one place").to_string();
        assert!(err.contains("places for 1 images, but 2 were given"), "{err}");
        let mut none = request("gemma3", case);
        none.images.clear();
        let err = h.submit(none).err().expect("image tokens without an image").to_string();
        assert!(err.contains("places for 1 images, but 0 were given"), "{err}");
        let mut short = request("gemma3", case);
        short.prompt.retain(|&t| t != case_image_token());
        short.prompt.insert(5, case_image_token());
        let err = h.submit(short).err().expect("a run of the wrong length").to_string();
        assert!(err.contains("an image takes 16 tokens"), "{err}");
        // A text model refuses images outright.
        let text = Engine::start(common::model("smollm2"), common::compute(), EngineConfig::default()).unwrap();
        let err = text.submit(GenerationRequest { prompt: vec![1, 2, 3], images: images("gemma3", &["strip.png"]), ..Default::default() }).err().unwrap().to_string();
        assert!(err.contains("does not take images"), "{err}");
    }
}

/// The Gemma 3 fixture as a llama.cpp model pair (`gemma3-gguf/`: the language model as a
/// Q8_0 GGUF, the vision side as an `mmproj` file written by llama.cpp's converter, f16)
/// against the checkpoint quantized to Q8_0 at load: the same text weights, the same
/// numerics, vision weights rounded to f16. The encoders agree to within f16 rounding and
/// the answers are the same tokens.
#[test]
fn gemma3_llama_cpp_pair_matches_the_checkpoint() {
    let dir = fixtures().join("gemma3-gguf");
    let checkpoint = Arc::new(LoadedModel::load_quantized(&fixtures().join("gemma3"), Some(kiln_kernels::DType::Q8_0)).unwrap());
    let mut pair = LoadedModel::load(&dir.join("text.gguf")).unwrap();
    let hidden = pair.model.config().hidden_size;
    pair.vision = Some(Arc::new(kiln_worker::vision::VisionModel::from_mmproj(&dir.join("mmproj.gguf"), hidden, &pair.tokenizer).unwrap()));
    let pair = Arc::new(pair);
    let (a, b) = (checkpoint.vision.as_ref().unwrap(), pair.vision.as_ref().unwrap());
    assert_eq!(a.info, b.info, "the same image tokens");
    assert_eq!(a.processor, b.processor, "the same image processing");
    let image = a.processor.prepare(&image_bytes("chelsea.png"), &ImageLimits::default()).unwrap();
    let (ea, eb) = (a.encode(&common::compute(), &[&image], &mut Scratch::default()).unwrap(), b.encode(&common::compute(), &[&image], &mut Scratch::default()).unwrap());
    let scale = ea[0].iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = ea[0].iter().zip(eb[0].iter()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    eprintln!("mmproj embeddings: largest difference {worst:.2e} of values up to {scale:.2}");
    // f16 weights: a relative step of 2^-11 per product, over a few layers.
    assert!(worst <= 1e-2 * scale, "mmproj embeddings differ by {worst} (values up to {scale})");
    for case in reference("gemma3")["cases"].as_array().unwrap() {
        let images: Vec<&str> = case["images"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        let answer = |model: &Arc<LoadedModel>| {
            let vision = model.vision.as_ref().unwrap();
            let prepared: Vec<_> = images.iter().map(|n| Arc::new(vision.processor.prepare(&image_bytes(n), &ImageLimits::default()).unwrap())).collect();
            let prompt = vision.info.expand(case["prompt"].as_str().unwrap(), &vision.info.counts(&prepared));
            let ids = model.tokenizer.encode(&prompt, false, true);
            let engine = kiln_worker::engine::Engine::start(Arc::clone(model), common::compute(), Default::default()).unwrap();
            let req = kiln_worker::engine::GenerationRequest {
                prompt: ids,
                sampling: kiln_shared::sampling::SamplingParams::greedy(),
                max_tokens: Some(16),
                ignore_eos: true,
                images: prepared,
                ..Default::default()
            };
            let mut tokens = Vec::new();
            for e in engine.submit(req).unwrap() {
                match e {
                    kiln_worker::engine::Event::Token { id, .. } => tokens.push(id),
                    kiln_worker::engine::Event::Failed(msg) => panic!("{msg}"),
                    _ => {}
                }
            }
            tokens
        };
        assert_eq!(answer(&pair), answer(&checkpoint), "{}: the llama.cpp pair answers as the checkpoint", case["name"]);
    }
}
