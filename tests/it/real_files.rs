//! What published InternVL GGUFs carry beyond the fixtures' form, served as a
//! user would: an untied `output.weight` (the real InternVL3-1B's language
//! model has one) and the quantizations people download (F16, Q8_0,
//! Q4_K_M), made from the converter-made fixtures with llama.cpp's own
//! quantizer. The fixtures themselves already have what else real files
//! have: no BOS keys, 3-D class and position tensors, `general.*` keys.

use crate::common;

use std::path::{Path, PathBuf};

use common::parity::*;
use common::*;
use internvl_core::gguf;
use internvl_grpc::config::Config;
use internvl_grpc::service::proto;
use internvl_llama::{self as llama, Quantization};

fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-files");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The language model at `src` with an untied `output.weight` holding
/// `scale` × `token_embd.weight` (F32): at 1 the same function, in the layout
/// of a model whose output projection is its own tensor.
fn with_untied_output(src: &Path, dst: &Path, scale: f32) {
    let bytes = std::fs::read(src).unwrap();
    let file = gguf::parse(bytes.as_slice(), bytes.len() as u64).unwrap();
    assert!(file.tensor("output.weight").is_none(), "already untied");
    let embd = file.tensor("token_embd.weight").unwrap().clone();
    let layout = file.layout;
    let data = &bytes[layout.data_start as usize..];
    let align = |n: usize| n.div_ceil(layout.alignment as usize) * layout.alignment as usize;
    let offset = align(data.len());

    let mut out = bytes[..8].to_vec();
    out.extend((file.tensors.len() as u64 + 1).to_le_bytes());
    out.extend(&bytes[16..layout.header_end as usize]);
    gguf::push_string(&mut out, "output.weight");
    out.extend((embd.dims.len() as u32).to_le_bytes());
    for d in &embd.dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(embd.ggml_type.to_le_bytes());
    out.extend((offset as u64).to_le_bytes());
    out.resize(align(out.len()), 0);
    out.extend(data);
    out.resize(out.len() + (offset - data.len()), 0);
    let start = (layout.data_start + embd.offset) as usize;
    assert_eq!(embd.ggml_type, 0, "the fixtures are F32");
    out.extend(
        bytes[start..start + embd.bytes as usize]
            .chunks_exact(4)
            .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * scale).to_le_bytes()),
    );
    std::fs::write(dst, out).unwrap();
}

fn serving(family: &Family, model: &Path) -> Config {
    Config {
        model: model.display().to_string(),
        mmproj: family.mmproj_path().display().to_string(),
        ..family.config()
    }
}

/// The chat cases with a text prompt, one image, two images and a video.
const CASES: [&str; 4] = ["text_system", "image_landscape", "two_images", "vid_video"];

async fn chat_results(family: &Family, config: Config) -> Vec<CaseResult> {
    let reference = family.reference();
    let server = start(config).await;
    let mut client = server.client().await;
    let mut results = Vec::new();
    for case in reference["chat"].as_array().unwrap() {
        if CASES.contains(&case["id"].as_str().unwrap()) {
            results.push(check_chat_case(&mut client, family, case).await);
        }
    }
    // Embed answers too, with the family's width.
    let embedded = client
        .embed(proto::EmbedRequest {
            inputs: vec![proto::EmbedInput {
                content: vec![image(image_bytes("square_448.png")), text("a photo")],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(embedded.dimensions, 64);
    server.stop().await;
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untied_output_weight_gives_the_reference_answers() {
    for family in FAMILIES {
        let untied = scratch().join(format!("untied-{}", family.model));
        with_untied_output(&family.model_path(), &untied, 1.0);
        let header = gguf::read(&untied).unwrap();
        assert!(header.tensor("output.weight").is_some());
        for result in chat_results(family, serving(family, &untied)).await {
            eprintln!("{} untied {}", family.name, result.summary());
            assert!(result.failures.is_empty(), "{:?}", result.failures);
        }
        // The control: llama.cpp really reads the separate tensor, so doubling
        // it (doubled logits) must break the protocol.
        let doubled = scratch().join(format!("doubled-{}", family.model));
        with_untied_output(&family.model_path(), &doubled, 2.0);
        let results = chat_results(family, serving(family, &doubled)).await;
        assert!(
            results.iter().all(|r| !r.failures.is_empty()),
            "{}: a doubled output.weight still matched the reference",
            family.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_language_files_are_served() {
    llama::init_backend(false, &[]).unwrap();
    for family in FAMILIES {
        // Largest top-5 |Δ| against the reference at the last prompt
        // position, per quantization: about twice the worst measured over
        // both families' cases (Q8_0 0.288, Q4_K_M 1.491 with these random
        // rows). A quantized path that emits garbage misses them by far.
        for (to, name, bound) in [
            (Quantization::F16, "F16", LOGIT_TOLERANCE),
            (Quantization::Q8_0, "Q8_0", 0.6),
            (Quantization::Q4KM, "Q4_K_M", 3.0),
        ] {
            let file = scratch().join(format!("{name}-{}", family.model));
            llama::quantize(&family.model_path(), &file, to).unwrap();
            let results = chat_results(family, serving(family, &file)).await;
            for r in &results {
                eprintln!("{} {name} {}", family.name, r.summary());
            }
            // F16 keeps the reference's answers; the coarser formats change
            // a random model's logits by more than the protocol allows, so
            // they are held to their own measured bound.
            if to == Quantization::F16 {
                let failures: Vec<&String> = results.iter().flat_map(|r| &r.failures).collect();
                assert!(failures.is_empty(), "{} F16: {failures:?}", family.name);
            }
            assert_eq!(results.len(), CASES.len());
            for r in &results {
                assert!(
                    r.worst_top5 <= bound,
                    "{} {name} {}: top-5 |Δ| {:.4} over {bound}",
                    family.name,
                    r.id,
                    r.worst_top5
                );
            }
        }
    }
}

/// InternVL3.5's `<think>` and `</think>` are ordinary tokens of its
/// vocabulary: one id each, streamed as their text, and a stop sequence of
/// `</think>` ends the reply there (README: "InternVL3.5 and `<think>`").
#[test]
fn think_tokens_stream_as_text_and_stop_sequences_see_them() {
    use internvl_core::sampling::TextStream;
    use internvl_llama::{Model, ModelParams};

    llama::init_backend(false, &[]).unwrap();
    let model = Model::load(
        &INTERNVL35.model_path(),
        &ModelParams {
            n_gpu_layers: 0,
            main_gpu: 0,
            split_mode: internvl_grpc::engine::SplitMode::None,
            tensor_split: vec![],
            devices: vec![],
            rpc_servers: vec![],
            vulkan_devices: vec![],
        },
    )
    .unwrap();
    let special = &INTERNVL35.reference()["model"]["special_tokens"];
    let mut stream = TextStream::new(vec!["</think>".into()]);
    let mut text = String::new();
    for marker in ["<think>", "</think>"] {
        let id = special[marker].as_i64().unwrap() as i32;
        assert_eq!(model.tokenize(marker, false, true).unwrap(), [id]);
        // What the engine streams for a generated token.
        let piece = model.token_bytes(id, false);
        assert_eq!(piece, marker.as_bytes(), "{marker} is streamed as its text");
        let released = stream.push(&piece);
        text.push_str(&released.text);
        if marker == "<think>" {
            assert!(!released.stopped);
            text.push_str(&stream.push(b"reasoning").text);
        } else {
            assert!(released.stopped, "the stop sequence matches the token");
        }
    }
    assert_eq!(text, "<think>reasoning");
}
