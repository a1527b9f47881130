//! Vision input against transformers: the image processor's pixel values for photographs
//! and odd synthetic images, and a tiny random-weight Gemma 3 vision-language checkpoint
//! (worker/tests/fixtures/vision, made by scripts/goldens/make_vision_fixtures.py) giving the
//! processor's token ids, the logits of the last 8 prompt positions within 1e-4 and the same
//! 16 greedy tokens for prompts with one and with two images.

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
    std::fs::read(fixtures().join("images").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reference_pixels(name: &str, model: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixtures().join("images").join(format!("{name}.{model}.f32"))).unwrap();
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn gemma3() -> Arc<LoadedModel> {
    let model = LoadedModel::load(&fixtures().join("gemma3")).unwrap_or_else(|e| panic!("gemma3: {e}"));
    assert!(model.unused_tensors.is_empty(), "unused tensors {:?}", model.unused_tensors);
    Arc::new(model)
}

#[test]
fn gemma3_processor_matches_transformers() {
    let model = gemma3();
    let processor = &model.vision.as_ref().expect("a vision model").processor;
    // PNG, GIF and lossless WebP decode to the same bytes everywhere, and the resize is
    // Pillow's integer arithmetic: every value equal. JPEG decoders may differ by a step.
    for (name, exact) in [
        ("chelsea.png", true),
        ("camera.png", true),
        ("gradient_alpha.png", true),
        ("palette.gif", true),
        ("lossless.webp", true),
        ("strip.png", true),
        ("rocket.jpg", false),
    ] {
        let got = processor.prepare(&image_bytes(name), &ImageLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}")).pixels;
        let want = reference_pixels(name, "gemma3");
        assert_eq!(got.len(), want.len(), "{name}");
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{name}: largest difference {worst:.2e}");
        if exact {
            assert!(worst == 0.0, "{name}: pixel values differ by up to {worst}");
        } else {
            // One 8-bit step after normalization by std 0.5 is 2/255; allow a few.
            assert!(worst <= 4.0 * 2.0 / 255.0 + 1e-6, "{name}: pixel values differ by up to {worst}");
        }
    }
}

/// The reference case's prompt tokens and its images placed in them.
fn prepare(model: &LoadedModel, case: &serde_json::Value) -> (Vec<u32>, Vec<ImageSpan>) {
    let vision = model.vision.as_ref().unwrap();
    let prompt = vision.info.expand(case["prompt"].as_str().unwrap());
    let ids = model.tokenizer.encode(&prompt, false, true);
    assert_eq!(ids, common::ids(&case["ids"]), "{}: prompt token ids", case["name"]);
    let prepared: Vec<_> = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| vision.processor.prepare(&image_bytes(n.as_str().unwrap()), &ImageLimits::default()).unwrap())
        .collect();
    let refs: Vec<_> = prepared.iter().collect();
    let embeddings = vision.encode(&common::compute(), &refs, &mut Scratch::default()).unwrap();
    let keyed: Vec<_> = embeddings.into_iter().zip(prepared.iter().map(|p| p.key)).collect();
    (ids.clone(), vision.info.place(&ids, &keyed).unwrap())
}

#[test]
fn gemma3_logits_and_greedy_tokens_match_transformers() {
    let model = gemma3();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("gemma3/reference.json")).unwrap()).unwrap();
    let vocab = model.model.config().vocab_size;
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (ids, images) = prepare(&model, case);
        let mut session = Session::new(Arc::clone(&model), common::compute(), 256);
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
        eprintln!("{name}: largest logit difference {:.2e} (position {}, token {})", worst.0, worst.1, worst.2);
        assert!(worst.0 <= LOGIT_TOLERANCE, "{name}: logit at position {} token {} differs by {:.2e}", worst.1, worst.2, worst.0);

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
        assert_eq!(greedy, common::ids(&case["greedy"]), "{name}: greedy tokens");
    }
}
