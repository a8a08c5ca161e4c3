//! Parity with the reference implementation (transformers' InternVL), through
//! the real server over gRPC: every chat and embed case of `reference.json`.
//!
//! A case passes when text token ids and image-token counts are exact, greedy
//! tokens equal the reference up to the first near-tie (reference margin < 0.1),
//! the top-5 ids at the last prompt position match with values within 0.25, and
//! embeddings have cosine >= 0.999. The service reports log-probabilities, which
//! are the logits shifted by one constant per position; the reference logits
//! are shifted the same way (log-softmax) before comparing.

mod common;

use common::*;
use internvl_grpc::service::proto;

const MARGIN_TIE: f64 = 0.1;
const LOGIT_TOLERANCE: f32 = 0.25;
const COSINE_MIN: f64 = 0.999;

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chat_case_matches_the_reference() {
    let reference = reference();
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    let mut failures = Vec::new();
    for case in reference["chat"].as_array().expect("chat cases") {
        let id = case["id"].as_str().expect("id");
        let messages = reference_messages(case);

        // Prompt: exact ids (image positions carry <IMG_CONTEXT>) and counts.
        let count = client
            .count_tokens(proto::CountTokensRequest {
                messages: messages.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{id}: CountTokens: {e}"))
            .into_inner();
        let want_ids = ids(&case["input_ids"]);
        if count.input_ids != want_ids {
            let first = count
                .input_ids
                .iter()
                .zip(&want_ids)
                .position(|(a, b)| a != b);
            failures.push(format!(
                "{id}: input ids differ (len {} vs {}, first difference at {first:?})",
                count.input_ids.len(),
                want_ids.len()
            ));
        }
        assert_eq!(
            count.prompt_tokens as usize,
            want_ids.len(),
            "{id}: prompt_tokens"
        );
        assert_eq!(
            count.image_tokens,
            case["image_token_count"].as_u64().unwrap() as u32,
            "{id}: image_tokens"
        );

        // Generation: greedy ids up to the first near-tie, top-5 at the last prompt position.
        let mut request = greedy(messages, 24);
        request.top_logprobs = 5;
        request.request_id = id.to_string();
        let stream = client
            .generate(request)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"))
            .into_inner();
        let got = collect(stream)
            .await
            .unwrap_or_else(|e| panic!("{id}: stream: {e}"));
        let done = got.done.as_ref().unwrap_or_else(|| panic!("{id}: no Done"));
        let usage = done.usage.unwrap();
        assert_eq!(
            usage.prompt_tokens as usize,
            want_ids.len(),
            "{id}: usage.prompt_tokens"
        );
        assert_eq!(usage.completion_tokens, 24, "{id}: completion_tokens");
        assert_eq!(
            done.finish_reason,
            proto::FinishReason::Length as i32,
            "{id}"
        );

        let want_greedy = ids(&case["greedy_ids"]);
        let margins: Vec<f64> = case["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let checked = margins
            .iter()
            .position(|&m| m < MARGIN_TIE)
            .unwrap_or(margins.len());
        if got.ids[..checked] != want_greedy[..checked] {
            failures.push(format!(
                "{id}: greedy ids differ within the first {checked} steps: got {:?}, want {:?}",
                &got.ids[..checked],
                &want_greedy[..checked]
            ));
        }

        let ref_logprobs = log_softmax(&npy(case["last_logits"].as_str().unwrap()));
        let top = &got.tokens[0].top;
        assert_eq!(top.len(), 5, "{id}: top_logprobs");
        let want_top = &ids(&case["last_logits_top20"]["ids"])[..5];
        let got_top: Vec<i32> = top.iter().map(|t| t.id).collect();
        if got_top != want_top {
            failures.push(format!("{id}: top-5 ids {got_top:?}, want {want_top:?}"));
        }
        for t in top {
            let want = ref_logprobs[t.id as usize];
            if (t.logprob - want).abs() > LOGIT_TOLERANCE {
                failures.push(format!(
                    "{id}: token {} log-prob {} vs reference {want}",
                    t.id, t.logprob
                ));
            }
        }
        eprintln!(
            "{id}: ok through step {checked}, top-5 max |Δ| {:.4}",
            top.iter()
                .map(|t| (t.logprob - ref_logprobs[t.id as usize]).abs())
                .fold(0.0f32, f32::max)
        );
    }
    server.stop().await;
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_embed_case_matches_the_reference() {
    let reference = reference();
    let server = start(tiny_config()).await;
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
            let want = npy(case[key].as_str().unwrap());
            let c = cosine(&embedding.values, &want);
            eprintln!("{id} {key}: cosine {c:.6}");
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
async fn tokenizer_matches_the_reference() {
    let reference = reference();
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    for case in reference["tokenize"].as_array().unwrap() {
        let t = case["text"].as_str().unwrap();
        let got = client
            .tokenize(proto::TokenizeRequest { text: t.into() })
            .await
            .unwrap()
            .into_inner()
            .ids;
        assert_eq!(got, ids(&case["ids"]), "{t:?}");
    }
    server.stop().await;
}
