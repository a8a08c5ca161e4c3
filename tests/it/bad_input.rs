//! Bad input gets INVALID_ARGUMENT naming the field, and the server keeps serving.

use crate::common;

use common::*;
use internvl_grpc::service::proto;
use tonic::Code;

fn hello() -> Vec<proto::Message> {
    vec![user(vec![text("Hello! Who are you?")])]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_the_server_keeps_serving() {
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    let landscape = image_bytes("landscape_800x600.jpg");

    let cases: Vec<(&str, proto::GenerateRequest, &str)> = vec![
        (
            "unknown role",
            greedy(
                vec![proto::Message {
                    role: "wizard".into(),
                    content: vec![text("hi")],
                }],
                4,
            ),
            "messages[0].role",
        ),
        ("empty messages", greedy(vec![], 4), "messages"),
        (
            "undecodable image",
            greedy(
                vec![user(vec![
                    image(b"definitely not an image".to_vec()),
                    text("?"),
                ])],
                4,
            ),
            "messages[0].content[0].image.data",
        ),
        (
            "truncated png",
            greedy(
                vec![user(vec![image(
                    image_bytes("square_448.png")[..200].to_vec(),
                )])],
                4,
            ),
            "messages[0].content[0].image.data",
        ),
        (
            "zero-pixel image",
            greedy(vec![user(vec![image(png_claiming(0, 0))])], 4),
            "messages[0].content[0].image.data",
        ),
        (
            "oversized image",
            greedy(
                vec![user(vec![
                    text("look"),
                    image(png_claiming(100_000, 100_000)),
                ])],
                4,
            ),
            "messages[0].content[1].image.data",
        ),
        (
            "empty image bytes",
            greedy(vec![user(vec![image(vec![])])], 4),
            "messages[0].content[0].image.data",
        ),
        ("max_new_tokens 0", greedy(hello(), 0), "max_new_tokens"),
        (
            "max_new_tokens beyond the context",
            greedy(hello(), 100_000),
            "max_new_tokens",
        ),
        // Cheap checks come first: with an image that does not decode, the
        // refusal names what needs no decoding (the image would be named if
        // it were decoded first).
        (
            "max_new_tokens beyond the context, with a bad image",
            greedy(vec![user(vec![image(b"not an image".to_vec())])], 100_000),
            "max_new_tokens",
        ),
        (
            "a bad format, with a bad image",
            proto::GenerateRequest {
                response_format: Some(proto::ResponseFormat {
                    format: Some(proto::response_format::Format::Regex("(".into())),
                }),
                ..greedy(vec![user(vec![image(b"not an image".to_vec())])], 4)
            },
            "response_format.regex",
        ),
        (
            "prompt beyond the context",
            greedy(
                vec![user(vec![
                    image(landscape.clone()),
                    image(landscape.clone()),
                    image(landscape.clone()),
                    text("three big images"),
                ])],
                4,
            ),
            "messages",
        ),
        (
            "reserved marker in text",
            greedy(vec![user(vec![text("sneaky <IMG_CONTEXT> marker")])], 4),
            "messages[0].content[0].text",
        ),
        (
            "negative temperature",
            proto::GenerateRequest {
                sampling: Some(proto::SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                }),
                ..greedy(hello(), 4)
            },
            "sampling.temperature",
        ),
        (
            "top_p above one",
            proto::GenerateRequest {
                sampling: Some(proto::SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                }),
                ..greedy(hello(), 4)
            },
            "sampling.top_p",
        ),
        (
            "too many top_logprobs",
            proto::GenerateRequest {
                top_logprobs: 100_000,
                ..greedy(hello(), 4)
            },
            "top_logprobs",
        ),
        (
            "empty stop string",
            proto::GenerateRequest {
                stop: vec![String::new()],
                ..greedy(hello(), 4)
            },
            "stop[0]",
        ),
        (
            "min_tiles above max_tiles",
            greedy(
                vec![user(vec![proto::Content {
                    part: Some(proto::content::Part::Image(proto::Image {
                        data: landscape.clone(),
                        max_tiles: 2,
                        min_tiles: 6,
                        ..Default::default()
                    })),
                }])],
                4,
            ),
            "messages[0].content[0].image.min_tiles",
        ),
        (
            "content without a part",
            greedy(vec![user(vec![proto::Content { part: None }])], 4),
            "messages[0].content[0]",
        ),
        (
            "empty video",
            greedy(
                vec![user(vec![proto::Content {
                    part: Some(proto::content::Part::Video(proto::Video::default())),
                }])],
                4,
            ),
            // No source of the three (frames, data, url): the video is named.
            "messages[0].content[0].video",
        ),
    ];

    for (name, request, field) in cases {
        let status = match client.generate(request).await {
            Ok(response) => collect(response.into_inner())
                .await
                .err()
                .unwrap_or_else(|| {
                    panic!("{name}: accepted");
                }),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{name}: message {:?} does not name {field}",
            status.message()
        );
        // The server still answers a valid request after each refusal.
        let ok = collect(
            client
                .generate(greedy(hello(), 2))
                .await
                .expect("valid request")
                .into_inner(),
        )
        .await
        .expect("valid stream");
        assert_eq!(ok.ids.len(), 2, "{name}: follow-up request");
    }

    let status = client
        .embed(proto::EmbedRequest {
            inputs: vec![proto::EmbedInput {
                content: vec![image(b"GIF89a broken".to_vec())],
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("inputs[0].content[0].image.data:"),
        "{}",
        status.message()
    );
    server.stop().await;
}

/// Hostile text through llama.cpp's tokenizer, as `CountTokens` (chat
/// template, then tokens) and `Tokenize` take it: fragments of special tokens,
/// markers, control and combining characters, long runs, glued together by a
/// fixed pseudo-random draw. (The `chat_template` fuzz target renders such
/// text with a stand-in tokenizer, so that it builds without llama.cpp; this
/// is where the real one reads it.) Every answer is OK or INVALID_ARGUMENT,
/// and the server still serves after them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_is_tokenized_or_refused_and_never_aborts() {
    let server = start(tiny_config()).await;
    let mut client = server.client().await;
    let pieces = [
        "<|im_start|>",
        "<|im_end|>",
        "<|im_",
        "system\n",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<video>",
        "<think>",
        "</think>",
        "<|endoftext|>",
        "\u{0}",
        "\u{1}",
        "\u{7f}",
        "\r\n",
        "\u{202e}",
        "e\u{301}\u{301}\u{301}",
        "\u{1F600}",
        "\u{FFFD}",
        "\u{10FFFF}",
        " ",
        "  ",
        "\t",
        "a",
        "ĠĠ",
        "Ċ",
        "<",
        "|",
        ">",
        "{{",
        "}}",
        "{%",
        "%}",
        "\\",
        "\"",
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut answered = 0;
    for case in 0..300 {
        let len = 1 + next() % 24;
        let mut text: String = (0..len)
            .map(|_| pieces[(next() % pieces.len() as u64) as usize])
            .collect();
        if case % 50 == 0 {
            text = text.repeat(40);
        }
        for reply in [
            client
                .tokenize(proto::TokenizeRequest { text: text.clone() })
                .await
                .map(|_| ()),
            client
                .count_tokens(proto::CountTokensRequest {
                    messages: vec![user(vec![common::text(&text)])],
                })
                .await
                .map(|_| ()),
        ] {
            match reply {
                Ok(()) => answered += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::InvalidArgument, "{text:?}: {status}")
                }
            }
        }
    }
    assert!(answered > 0, "every hostile text was refused");
    generate_ok(&mut client, greedy(hello(), 2)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_file_ends_run_with_its_name() {
    let mut config = tiny_config();
    config.model = "/nonexistent/model.gguf".into();
    config.mmproj = fixture("mmproj-tiny-internvl3-f32.gguf")
        .display()
        .to_string();
    let server = start_unready(config).await;
    let err = tokio::time::timeout(std::time::Duration::from_secs(30), server.handle)
        .await
        .expect("run ends")
        .expect("task")
        .expect_err("load must fail");
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}
