//! Work not repeated: a prompt that starts like the previous one resumes from
//! the KV cache, one that starts like a running one shares its cells, a tile
//! seen before is not encoded again, and answers stay the same.

use crate::common;

use common::*;
use internvl_grpc::service::proto;

async fn run(
    client: &mut internvl_grpc::service::proto::intern_vl_client::InternVlClient<
        tonic::transport::Channel,
    >,
    messages: Vec<proto::Message>,
) -> (Vec<i32>, proto::Usage, proto::Timings) {
    let got = generate_ok(client, greedy(messages, 8)).await;
    let done = got.done.unwrap();
    (got.ids, done.usage.unwrap(), done.timings.unwrap())
}

/// A question about the 13-tile landscape fixture.
fn ask(question: &str) -> Vec<proto::Message> {
    vec![user(vec![
        image(image_bytes("landscape_800x600.jpg")),
        text(question),
    ])]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prefixes_and_images_are_not_recomputed() {
    let server = start(tiny_config()).await;
    let mut client = server.client().await;

    let (first_ids, first, first_t) = run(&mut client, ask("Describe the picture.")).await;
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(first.cached_image_tiles, 0);
    assert!(first_t.vision_ms > 0.0);

    // The same request: everything but the last prompt token comes from the KV cache.
    let (again_ids, again, again_t) = run(&mut client, ask("Describe the picture.")).await;
    assert_eq!(again_ids, first_ids, "same answer from the cache");
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    assert_eq!(again_t.vision_ms, 0.0, "no tile encoded again");

    // Same image, another question: the image block is reused, the question is new.
    let (_, other, other_t) = run(&mut client, ask("What colors are there?")).await;
    assert!(other.cached_tokens > other.image_tokens, "{other:?}");
    assert!(other.cached_tokens < other.prompt_tokens - 1, "{other:?}");
    assert_eq!(other_t.vision_ms, 0.0);

    // An unrelated prompt in between does not push the image conversation
    // out: it stays cached whole.
    run(&mut client, vec![user(vec![text("Hello! Who are you?")])]).await;
    let (_, kept, _) = run(&mut client, ask("What colors are there?")).await;
    assert_eq!(kept.cached_tokens, kept.prompt_tokens - 1, "{kept:?}");
    server.stop().await;
}

/// Without a prefix cache the image's KV is gone after the request, but its
/// tiles are still in the image cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiles_outlive_the_kv_cache_that_held_them() {
    let server = start(internvl_grpc::config::Config {
        prefix_cache_mb: 0,
        ..tiny_config()
    })
    .await;
    let mut client = server.client().await;
    let (first_ids, _, _) = run(&mut client, ask("Describe the picture.")).await;

    // Its tiles are still in the image cache: no vision time, 13 cached tiles.
    let (back_ids, back, back_t) = run(&mut client, ask("Describe the picture.")).await;
    assert_eq!(back_ids, first_ids, "same answer from cached tiles");
    assert!(back.cached_tokens < back.image_tokens, "{back:?}");
    assert_eq!(back.cached_image_tiles, 13);
    assert_eq!(back_t.vision_ms, 0.0);
    server.stop().await;
}

/// Fewest decisive tokens the shared and the alone reply are compared over:
/// all 8 when measured.
const MIN_COMPARED: usize = 8;

/// A question about the same picture while a first one is still answered:
/// the second shares the running sequence's cells for the image instead of
/// decoding them again (the prefix cache is off, so nothing else could
/// supply them), and answers as it does alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_share_their_common_prefix() {
    let server = start(internvl_grpc::config::Config {
        parallel: 2,
        n_ctx: 2 * 8192,
        prefix_cache_mb: 0,
        ..tiny_config()
    })
    .await;
    let mut client = server.client().await;

    let (started, mut running) = tokio::sync::mpsc::channel(1);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let first = spawn_timeline(
        client.clone(),
        greedy(ask("Describe the picture."), 4000),
        Some(started),
        Some(stopped),
    );
    running.recv().await.unwrap();
    let together = generate_ok(
        &mut client,
        greedy_with_margins(ask("What colors are there?"), 8),
    )
    .await;
    stop.send(true).unwrap();
    let first = first.await.unwrap();
    assert!(first.done.is_none(), "the first request ended too early");
    let usage = together.done.as_ref().unwrap().usage.unwrap();
    assert!(usage.cached_tokens > usage.image_tokens, "{usage:?}");
    assert!(usage.cached_tokens < usage.prompt_tokens - 1, "{usage:?}");

    let alone = generate_ok(
        &mut client,
        greedy_with_margins(ask("What colors are there?"), 8),
    )
    .await;
    let alone_usage = alone.done.as_ref().unwrap().usage.unwrap();
    assert_eq!(alone_usage.cached_tokens, 0, "nothing to share any more");
    let n = decisive_prefix(&alone.tokens, 0.01);
    eprintln!("shared and alone compared over {n} of 8 tokens");
    assert!(n >= MIN_COMPARED, "only {n} decisive tokens to compare");
    assert_eq!(together.ids[..n], alone.ids[..n]);
    server.stop().await;
}
