//! A client that drops its stream stops its generation within a decode step:
//! its slot is free for the next request at once instead of finishing the
//! abandoned one. One slot, so the next request must wait for exactly that.

use crate::common;

use std::time::Duration;

use common::*;

const LONG: u32 = 6000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_frees_the_engine() {
    let server = start(internvl_grpc::config::Config {
        parallel: 1,
        ..tiny_config()
    })
    .await;
    let mut client = server.client().await;
    let hello = || vec![user(vec![text("Hello! Who are you?")])];

    // How long the long generation takes when nobody cancels it.
    let full = generate_ok(&mut client, greedy(hello(), LONG)).await;
    assert_eq!(full.ids.len(), LONG as usize);
    let full_ms = full.done.unwrap().timings.unwrap().decode_ms;

    // Start it again, read a few tokens, then hang up.
    let mut stream = client
        .generate(greedy(hello(), LONG))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().expect("delta");
    }
    drop(stream);

    // The next request waits only for the cancelled one to notice, not for it
    // to finish: its queue time is a small fraction of the full run.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let next = generate_ok(&mut client, greedy(hello(), 2)).await;
    let queue_ms = next.done.unwrap().timings.unwrap().queue_ms;
    eprintln!("full run {full_ms:.0} ms; queue after cancel {queue_ms:.1} ms");
    assert!(
        queue_ms < full_ms / 4.0,
        "queued {queue_ms} ms behind a cancelled generation that takes {full_ms} ms in full"
    );
    server.stop().await;
}
