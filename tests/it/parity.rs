//! Parity with the reference implementation (transformers' InternVL), through
//! the real server over gRPC: every chat and embed case of `reference.json`.
//!
//! A case passes when text token ids and image-token counts are exact, greedy
//! tokens equal the reference at every step up to the first where they differ,
//! which only a reference near-tie (margin < 0.1) allows, the top-5 ids at the
//! last prompt position match in order (two a near-tie apart may swap) with
//! values within 0.06 (the fixtures' own
//! protocol allows 0.25; the worst measured is 0.0231), and embeddings have
//! cosine >= 0.999. The service reports log-probabilities, which
//! are the logits shifted by one constant per position; the reference logits
//! are shifted the same way (log-softmax) before comparing.

use crate::common;

use common::parity::*;
use common::*;
use internvl_grpc::service::proto;

async fn chat_cases(family: &Family) {
    let reference = family.reference();
    let server = start(family.config()).await;
    let mut client = server.client().await;
    let mut failures = Vec::new();
    for case in reference["chat"].as_array().expect("chat cases") {
        let checked = check_chat_case(&mut client, family, case).await;
        eprintln!("{} {}", family.name, checked.summary());
        failures.extend(checked.failures);
    }
    server.stop().await;
    assert!(
        failures.is_empty(),
        "{} parity failures:\n{}",
        family.name,
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internvl3_chat_cases_match_the_reference() {
    chat_cases(&INTERNVL3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internvl35_chat_cases_match_the_reference() {
    chat_cases(&INTERNVL35).await;
}

async fn embed_cases(family: &Family) {
    let reference = family.reference();
    let server = start(family.config()).await;
    let mut client = server.client().await;
    for case in reference["embed"].as_array().expect("embed cases") {
        let id = case["id"].as_str().unwrap();
        let mut content = Vec::new();
        if let Some(name) = case["input"]["image"].as_str() {
            content.push(image(image_bytes(name)));
        }
        if let Some(t) = case["input"]["text"].as_str() {
            content.push(text(t));
        }
        for (pooling, key) in [
            (proto::Pooling::Mean, "mean"),
            (proto::Pooling::Last, "last"),
        ] {
            let response = client
                .embed(proto::EmbedRequest {
                    inputs: vec![proto::EmbedInput {
                        content: content.clone(),
                    }],
                    pooling: pooling as i32,
                    normalize: false,
                    request_id: id.into(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"))
                .into_inner();
            assert_eq!(response.dimensions, 64, "{id}");
            let embedding = &response.embeddings[0];
            assert_eq!(
                embedding.tokens as u64,
                case["input_ids_len"].as_u64().unwrap(),
                "{id}: pooled positions"
            );
            let want = family.npy(case[key].as_str().unwrap());
            let c = cosine(&embedding.values, &want);
            eprintln!("{} {id} {key}: cosine {c:.6}", family.name);
            assert!(c >= COSINE_MIN, "{id} {key}: cosine {c}");
        }
    }
    // Normalized output has unit length and the same direction.
    let response = client
        .embed(proto::EmbedRequest {
            inputs: vec![proto::EmbedInput {
                content: vec![text("A photo of a cat.")],
            }],
            normalize: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let norm: f32 = response.embeddings[0]
        .values
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internvl3_embed_cases_match_the_reference() {
    embed_cases(&INTERNVL3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internvl35_embed_cases_match_the_reference() {
    embed_cases(&INTERNVL35).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_grids_match_the_reference() {
    let reference = reference();
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    for img in reference["images"].as_array().unwrap() {
        let name = img["image"].as_str().unwrap();
        let count = client
            .count_tokens(proto::CountTokensRequest {
                messages: vec![user(vec![image(image_bytes(name)), text("?")])],
            })
            .await
            .unwrap()
            .into_inner();
        let grid = &count.images[0];
        assert_eq!(
            (grid.cols, grid.rows, grid.tiles),
            (
                img["grid_cols"].as_u64().unwrap() as u32,
                img["grid_rows"].as_u64().unwrap() as u32,
                img["num_tiles"].as_u64().unwrap() as u32
            ),
            "{name}"
        );
        assert_eq!(
            count.image_tokens + 2,
            img["image_tokens"].as_u64().unwrap() as u32,
            "{name}: image tokens plus <img> and </img>"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizers_match_the_reference() {
    for family in FAMILIES {
        let reference = family.reference();
        let server = start(family.config()).await;
        let mut client = server.client().await;
        for case in reference["tokenize"].as_array().unwrap() {
            let t = case["text"].as_str().unwrap();
            let got = client
                .tokenize(proto::TokenizeRequest { text: t.into() })
                .await
                .unwrap()
                .into_inner()
                .ids;
            assert_eq!(got, ids(&case["ids"]), "{}: {t:?}", family.name);
        }
        server.stop().await;
    }
}

/// Special-token strings in a user's text are read as the special tokens,
/// as the reference's tokenizer reads them (its `tokenize` case of
/// `<|im_start|>user\nhi<|im_end|>`): a user can write a turn marker into
/// the prompt. Parity decides; README ("Special tokens in user text") says
/// what a deployment that faces untrusted users should do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_tokens_in_user_text_are_read_as_the_reference_reads_them() {
    for family in FAMILIES {
        let reference = family.reference();
        let case = reference["tokenize"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["text"].as_str().unwrap().contains("<|im_start|>"))
            .expect("a tokenize case with special-token strings");
        let want = ids(&case["ids"]);
        let im_start = reference["model"]["special_tokens"]["<|im_start|>"]
            .as_i64()
            .unwrap() as i32;
        assert_eq!(
            want[0], im_start,
            "the reference reads the marker as one token"
        );
        let server = start(family.config()).await;
        let mut client = server.client().await;
        let count = client
            .count_tokens(proto::CountTokensRequest {
                messages: vec![user(vec![text(case["text"].as_str().unwrap())])],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            count.input_ids.windows(want.len()).any(|w| w == want),
            "{}: the user's text is not the reference's ids {want:?} in {:?}",
            family.name,
            count.input_ids
        );
        server.stop().await;
    }
}
