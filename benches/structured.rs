//! Structured output's cost: decode speed with a JSON Schema against the same
//! run unconstrained (1 and 8 streams), with jump-forward and without (two
//! servers, runs interleaved), for an order of eight lines and for a
//! schema-heavy record (long keys, short values); time to first token for a
//! new schema (compiled) and a cached one; the constraint's time per token.
//!
//! `cargo bench --bench structured` uses the bundled tiny model. Real shapes:
//! `INTERNVL_BENCH_MODEL=DIR/…gguf INTERNVL_BENCH_MMPROJ=DIR/mmproj-…gguf cargo bench --bench structured`
//! (see `benches/README.md`). INTERNVL_BENCH_THREADS (default: all cores),
//! INTERNVL_BENCH_REPEATS (2).

mod common;
#[path = "common/server.rs"]
mod server;

use std::time::Instant;

use internvl_grpc::config::Config;
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};
use proto::response_format::Format;
use tonic::transport::Channel;

use common::{env_or, median, model_pair, threads};
use server::{serve, Served};

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

/// A record whose keys are most of its text: long names, each value a few
/// tokens (enums, booleans, small integers), as an extraction schema is.
fn long_keys() -> String {
    let keys = [
        (
            "customer_billing_address_country",
            serde_json::json!({"enum": ["FR", "DE", "IT", "ES"]}),
        ),
        (
            "customer_has_accepted_terms_and_conditions",
            serde_json::json!({"type": "boolean"}),
        ),
        (
            "number_of_items_in_the_shopping_basket",
            serde_json::json!({"type": "integer", "minimum": 0, "maximum": 99}),
        ),
        (
            "preferred_delivery_time_window",
            serde_json::json!({"enum": ["morning", "afternoon", "evening"]}),
        ),
        (
            "is_eligible_for_free_express_shipping",
            serde_json::json!({"type": "boolean"}),
        ),
        (
            "loyalty_programme_membership_level",
            serde_json::json!({"enum": ["none", "silver", "gold"]}),
        ),
        (
            "requires_signature_upon_delivery",
            serde_json::json!({"type": "boolean"}),
        ),
        (
            "number_of_previous_orders_this_year",
            serde_json::json!({"type": "integer", "minimum": 0, "maximum": 99}),
        ),
    ];
    let properties: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let required: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
    serde_json::json!({
        "type": "object", "properties": properties, "required": required,
        "additionalProperties": false
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

/// One call: (completion tokens, its Done usage and timings).
async fn call(
    client: &InternVlClient<Channel>,
    r: proto::GenerateRequest,
) -> (u32, proto::Usage, proto::Timings) {
    let mut stream = client.clone().generate(r).await.unwrap().into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(proto::generate_response::Event::Done(d)) = m.event {
            let usage = d.usage.unwrap();
            return (usage.completion_tokens, usage, d.timings.unwrap());
        }
    }
    panic!("stream without Done");
}

/// What `streams` calls at once did.
struct Burst {
    /// Seconds until the last reply was complete.
    wall: f64,
    tokens: u32,
    forced: u32,
    constraint_ms: f64,
}

impl Burst {
    fn rate(&self) -> f64 {
        f64::from(self.tokens) / self.wall
    }
}

/// `streams` calls at once, each with `format` (free: exactly `tokens`).
async fn burst(
    client: &InternVlClient<Channel>,
    streams: usize,
    format: Option<String>,
    tokens: u32,
) -> Burst {
    let start = Instant::now();
    let calls: Vec<_> = (0..streams)
        .map(|i| {
            let c = client.clone();
            let r = request(format.clone(), tokens, i as u64 + 1);
            tokio::spawn(async move { call(&c, r).await })
        })
        .collect();
    let mut out = Burst {
        wall: 0.0,
        tokens: 0,
        forced: 0,
        constraint_ms: 0.0,
    };
    for c in calls {
        let (t, usage, timings) = c.await.unwrap();
        out.tokens += t;
        out.forced += usage.forced_tokens;
        out.constraint_ms += timings.constraint_ms;
    }
    out.wall = start.elapsed().as_secs_f64();
    out
}

fn main() {
    let (model, mmproj) = model_pair();
    let threads = threads();
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
        // Two servers, one with jump-forward and one without; only one works
        // at a time.
        let Served {
            client,
            stop,
            server,
            ..
        } = serve(config.clone()).await;
        let Served {
            client: stepping,
            stop: stop_stepping,
            server: stepping_server,
            ..
        } = serve(Config {
            jump_forward: false,
            ..config
        })
        .await;
        println!("model {} ({threads} threads), {repeats} repeats", model.display());

        // Time to first token: free, a schema never seen (compiled), the
        // same schema again (cached). The prompt is in the prefix cache after
        // the warm-up, so the differences are the constraint's.
        call(&client, request(None, 1, 0)).await;
        call(&stepping, request(None, 1, 0)).await;
        let (mut free, mut fresh, mut cached) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..repeats.max(3) {
            free.push(call(&client, request(None, 1, 0)).await.2.ttft_ms);
            let new = schema(&format!("order {r}"));
            fresh.push(call(&client, request(Some(new.clone()), 1, 0)).await.2.ttft_ms);
            cached.push(call(&client, request(Some(new), 1, 0)).await.2.ttft_ms);
        }
        println!(
            "TTFT ms (median): free {:.1}, new schema {:.1}, cached schema {:.1}",
            median(free),
            median(fresh),
            median(cached)
        );

        for (name, format) in [("order", schema("order")), ("long keys", long_keys())] {
            // Compiled on both servers before anything is timed.
            call(&client, request(Some(format.clone()), 1, 0)).await;
            call(&stepping, request(Some(format.clone()), 1, 0)).await;
            for streams in [1usize, 8] {
                for repeat in 0..repeats {
                    let jumping = burst(&client, streams, Some(format.clone()), 400).await;
                    let stepped = burst(&stepping, streams, Some(format.clone()), 400).await;
                    let per_stream = jumping.tokens / streams as u32;
                    let free = burst(&client, streams, None, per_stream).await;
                    println!(
                        "{name}, {streams} stream(s), run {}: until complete {:.0} ms jump-forward, {:.0} ms step by step, {:.0} ms free ({} tokens, {} forced; step by step {} tokens); tok/s {:.1} / {:.1} / {:.1}; jump-forward / free {:.3}; constraint {:.3} ms/token",
                        repeat + 1,
                        jumping.wall * 1e3,
                        stepped.wall * 1e3,
                        free.wall * 1e3,
                        jumping.tokens,
                        jumping.forced,
                        stepped.tokens,
                        jumping.rate(),
                        stepped.rate(),
                        free.rate(),
                        jumping.rate() / free.rate(),
                        jumping.constraint_ms / f64::from(jumping.tokens)
                    );
                }
            }
        }
        stop.send(()).ok();
        stop_stepping.send(()).ok();
        server.await.unwrap().unwrap();
        stepping_server.await.unwrap().unwrap();
    });
}
