//! Structured output's cost: decode speed with a JSON Schema against the same
//! run unconstrained (1 and 8 streams), time to first token for a new schema
//! (compiled) and a cached one, and the constraint's time per token.
//!
//! `cargo bench --bench structured` uses the bundled tiny model. Real shapes:
//! `INTERNVL_BENCH_MODEL=DIR/…gguf INTERNVL_BENCH_MMPROJ=DIR/mmproj-…gguf cargo bench --bench structured`
//! (see `benches/README.md`). INTERNVL_BENCH_THREADS (default: all cores),
//! INTERNVL_BENCH_REPEATS (2).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use internvl_grpc::config::Config;
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};
use proto::response_format::Format;
use tonic::transport::Channel;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An order of exactly eight lines: a reply of about a hundred tokens
/// whatever the weights, so both runs decode the same amount.
fn schema(title: &str) -> String {
    serde_json::json!({
        "title": title,
        "type": "object",
        "properties": {
            "lines": {
                "type": "array", "minItems": 8, "maxItems": 8,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99}
                    },
                    "required": ["sku", "qty"], "additionalProperties": false
                }
            },
            "currency": {"enum": ["EUR", "USD", "GBP"]}
        },
        "required": ["lines", "currency"], "additionalProperties": false
    })
    .to_string()
}

fn request(format: Option<String>, max_new_tokens: u32, seed: u64) -> proto::GenerateRequest {
    proto::GenerateRequest {
        messages: vec![proto::Message {
            role: "user".into(),
            content: vec![proto::Content {
                part: Some(proto::content::Part::Text(
                    "List the order's lines as JSON.".into(),
                )),
            }],
        }],
        sampling: Some(proto::SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        }),
        max_new_tokens,
        // The free run decodes as many tokens as the constrained one did.
        ignore_eos: format.is_none(),
        response_format: format.map(|s| proto::ResponseFormat {
            format: Some(Format::JsonSchema(s)),
        }),
        ..Default::default()
    }
}

/// One call: (completion tokens, its Done timings).
async fn call(
    client: &InternVlClient<Channel>,
    r: proto::GenerateRequest,
) -> (u32, proto::Timings) {
    let mut stream = client.clone().generate(r).await.unwrap().into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(proto::generate_response::Event::Done(d)) = m.event {
            return (d.usage.unwrap().completion_tokens, d.timings.unwrap());
        }
    }
    panic!("stream without Done");
}

/// `streams` calls at once: (tokens per second over the wall time, tokens,
/// constraint ms in all).
async fn burst(
    client: &InternVlClient<Channel>,
    streams: usize,
    format: Option<String>,
    tokens: u32,
) -> (f64, u32, f64) {
    let start = Instant::now();
    let calls: Vec<_> = (0..streams)
        .map(|i| {
            let c = client.clone();
            let r = request(format.clone(), tokens, i as u64 + 1);
            tokio::spawn(async move { call(&c, r).await })
        })
        .collect();
    let (mut n, mut constraint_ms) = (0, 0.0);
    for c in calls {
        let (t, timings) = c.await.unwrap();
        n += t;
        constraint_ms += timings.constraint_ms;
    }
    (
        f64::from(n) / start.elapsed().as_secs_f64(),
        n,
        constraint_ms,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-internvl");
    let model = std::env::var("INTERNVL_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| fixtures.join("tiny-internvl3-f32.gguf"));
    let mmproj = std::env::var("INTERNVL_BENCH_MMPROJ")
        .map(PathBuf::from)
        .unwrap_or_else(|_| fixtures.join("mmproj-tiny-internvl3-f32.gguf"));
    let threads = env_or(
        "INTERNVL_BENCH_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
    );
    let repeats: usize = env_or("INTERNVL_BENCH_REPEATS", 2);
    let config = Config {
        model: model.display().to_string(),
        mmproj: mmproj.display().to_string(),
        threads,
        n_ctx: 8192,
        parallel: 8,
        ..Config::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(internvl_grpc::run(config, listener, async move {
            stopped.await.ok();
        }));
        let client = loop {
            if let Ok(c) = InternVlClient::connect(format!("http://{addr}")).await {
                if c.clone().get_model_info(proto::GetModelInfoRequest {}).await.is_ok() {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("model {} ({threads} threads), {repeats} repeats", model.display());

        // Time to first token: free, a schema never seen (compiled), the
        // same schema again (cached). The prompt is in the prefix cache after
        // the warm-up, so the differences are the constraint's.
        call(&client, request(None, 1, 0)).await;
        let (mut free, mut fresh, mut cached) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..repeats.max(3) {
            free.push(call(&client, request(None, 1, 0)).await.1.ttft_ms);
            let new = schema(&format!("order {r}"));
            fresh.push(call(&client, request(Some(new.clone()), 1, 0)).await.1.ttft_ms);
            cached.push(call(&client, request(Some(new), 1, 0)).await.1.ttft_ms);
        }
        println!(
            "TTFT ms (median): free {:.1}, new schema {:.1}, cached schema {:.1}",
            median(free),
            median(fresh),
            median(cached)
        );

        let format = Some(schema("order"));
        for streams in [1usize, 8] {
            for repeat in 0..repeats {
                let (constrained_rate, tokens, constraint_ms) =
                    burst(&client, streams, format.clone(), 400).await;
                let per_stream = tokens / streams as u32;
                let (free_rate, _, _) = burst(&client, streams, None, per_stream).await;
                println!(
                    "{streams} stream(s), run {}: constrained {constrained_rate:.1} tok/s, free {free_rate:.1} tok/s, ratio {:.3}; {tokens} tokens, constraint {:.3} ms/token",
                    repeat + 1,
                    constrained_rate / free_rate,
                    constraint_ms / f64::from(tokens)
                );
            }
        }
        stop.send(()).ok();
        server.await.unwrap().unwrap();
    });
}
