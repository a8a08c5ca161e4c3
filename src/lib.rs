//! internvl-grpc: InternVL3 and InternVL3.5 vision-language models over
//! gRPC, on llama.cpp.
//!
//! The product API: [`run`] (the whole server; `main.rs` only parses
//! configuration, so tests start exactly what production runs),
//! [`config::Config`], the [`engine::Engine`] handle and its domain types,
//! the generated [`service::proto`] client and server, and the model
//! [`catalog`]. Layers run one way, as crates: this one ([`service`], tonic
//! handlers) → `internvl-engine` ([`engine`], scheduling) → `internvl-llama`
//! (llama.cpp), all on `internvl-core`. `docs/ARCHITECTURE.md` walks one
//! request through them, file by file.

// llama.cpp's unsafe code lives in `internvl-llama`; the one exception is
// `confine::close_from_3` (closing inherited descriptors before FFmpeg's
// exec), allowed there by name.
#![deny(unsafe_code)]

pub mod cli;
pub mod confine;
pub mod front;
pub mod media;
pub use internvl_engine as engine;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod service;
mod tls;
pub mod video;

pub use internvl_api::{catalog, config};

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::engine::Engine;
use crate::models::HubOptions;
use crate::service::auth::ApiKeys;
use crate::service::{proto, InternVlService};
use internvl_api::config::Config;
use internvl_api::proto::intern_vl_server::InternVlServer;

/// Why the server stopped other than by a requested shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration cannot be used.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The model could not be resolved or loaded.
    #[error("{0}")]
    Load(std::sync::Arc<engine::EngineError>),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// The engine failed while serving; the process should exit non-zero so
    /// that its orchestrator restarts it.
    #[error("{0}")]
    Fault(std::sync::Arc<engine::EngineError>),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The media fetcher could not be built.
    #[error("media: {0}")]
    Media(String),
    /// Reflection could not be set up.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The metrics address cannot be bound.
    #[error("metrics_listen {addr}: {message}")]
    Metrics {
        /// The address asked for.
        addr: String,
        /// Why it failed.
        message: String,
    },
    /// A TLS file is missing or unusable.
    #[error("{path}: {message}")]
    Tls {
        /// The file at fault.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// Serves the configured model on `listener` until `shutdown` resolves, then drains.
///
/// The port answers at once: health reports NOT_SERVING while the model files
/// are resolved and loaded, then SERVING. A model that fails to load ends the
/// server with [`ServeError::Load`], naming the file.
///
/// An error and its causes on one line (a transport error alone says only
/// "transport error"; a fetch error alone hides why the connection failed).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// On `shutdown`: health turns NOT_SERVING (load balancers stop routing here),
/// new calls get UNAVAILABLE, running requests get `drain_grace_secs` to
/// finish and are then cut with UNAVAILABLE; only then does the transport
/// close its connections.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Metrics {
                    addr: addr.clone(),
                    message: e.to_string(),
                })?,
        ),
        None => None,
    };
    run_with_metrics(config, listener, metrics_listener, shutdown).await
}

/// [`run`], with the Prometheus endpoint on an already bound `metrics_listener`
/// (tests bind `127.0.0.1:0`); `None` serves no metrics.
pub async fn run_with_metrics(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let settings = config.engine_settings()?;
    if let Some(why) = std::thread::available_parallelism()
        .ok()
        .and_then(|cpus| config.threads_warning(cpus.get()))
    {
        tracing::warn!("{why}");
    }
    let hub = HubOptions {
        cache_dir: config.hf_cache.clone(),
        offline: config.offline,
        endpoint: None,
    };
    let (model, mmproj) = (config.model.clone(), config.mmproj.clone());
    let engine = Engine::spawn(settings, move || models::resolve(&model, &mmproj, &hub))?;

    let metrics = std::sync::Arc::new(metrics::Metrics::default());
    let _metrics_task = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
        }
        AbortOnDrop(tokio::spawn(metrics::serve(
            l,
            metrics.clone(),
            engine.clone(),
        )))
    });
    let (routes, reporter) = routes(&config, &engine, metrics).await?;
    let tls = tls::server_config(&config)?;
    let (close_transport, transport_closed) = tokio::sync::oneshot::channel::<()>();
    // One connection opens at most this many calls at once; each is admitted
    // or refused on its own, but none costs anything before its turn.
    let router = Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .add_routes(routes);
    // A dropped sender means run() is returning: close as well.
    let closed = async move {
        transport_closed.await.ok();
    };
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => {
            Box::pin(router.serve_with_incoming_shutdown(tls::incoming(listener, tls), closed))
        }
        // Nagle off: a streamed token is one small write, and holding it
        // back for an ACK cost time to first token and decode throughput
        // (benches/README.md).
        None => Box::pin(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            closed,
        )),
    };
    tokio::pin!(server);

    let grace = std::time::Duration::from_secs_f64(config.drain_grace_secs);
    let drain = {
        let (engine, reporter) = (engine.clone(), reporter.clone());
        async move {
            shutdown.await;
            tracing::info!(grace_secs = grace.as_secs_f64(), "draining");
            set_health(&reporter, ServingStatus::NotServing).await;
            engine.drain(grace).await;
            tracing::info!("drained");
        }
    };
    tokio::pin!(drain);

    let mut loaded = false;
    let fault = loop {
        tokio::select! {
            served = &mut server => return served.map_err(ServeError::from),
            () = &mut drain => break None,
            ready = engine.wait_ready(), if !loaded => {
                ready.map_err(ServeError::Load)?;
                loaded = true;
                if !engine.is_draining() {
                    set_health(&reporter, ServingStatus::Serving).await;
                    tracing::info!("ready");
                }
            }
            fault = engine.wait_fault(), if loaded => {
                // Out of rotation at once; the engine has already answered
                // every open call with INTERNAL.
                set_health(&reporter, ServingStatus::NotServing).await;
                tracing::error!("{fault}; stopping so that the replica restarts");
                break Some(fault);
            }
        }
    };
    if close_transport.send(()).is_err() {
        tracing::debug!("transport already closed");
    }
    match fault {
        None => server.await?,
        Some(fault) => {
            // A short drain: the errors already sent reach their clients,
            // but a client that holds its connection cannot keep a dead
            // replica alive.
            if tokio::time::timeout(FAULT_DRAIN, &mut server)
                .await
                .is_err()
            {
                tracing::warn!("connections still open after the fault drain; closing");
            }
            return Err(ServeError::Fault(fault));
        }
    }
    Ok(())
}

/// The port's services, and the health reporter (NOT_SERVING until the
/// model is loaded): health and reflection (open, or behind the API keys),
/// the InternVL service behind the API keys, and the OpenAI API under
/// `/v1/` on the same handlers.
async fn routes(
    config: &Config,
    engine: &Engine,
    metrics: std::sync::Arc<metrics::Metrics>,
) -> Result<(tonic::service::Routes, tonic_health::server::HealthReporter), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let fetcher = media::Fetcher::new(config).map_err(ServeError::Media)?;
    let mut videos = video::VideoDecoder::new(config);
    // Video files are an option of the deployment: one whose FFmpeg or
    // sandbox cannot run still serves everything else, says why once here,
    // and answers each video file with FAILED_PRECONDITION and that reason.
    match videos.check().await {
        Ok(version) => tracing::info!(
            ffmpeg = %version,
            confinement = videos.confinement().map(|(how, _)| how).unwrap_or_default(),
            "video files on"
        ),
        Err(why) => tracing::warn!("video files off: {why}"),
    }
    let front = front::Front::new(
        engine.clone(),
        config.request_limits(),
        std::sync::Arc::new(fetcher),
        std::sync::Arc::new(videos),
    );
    let service = InternVlServer::new(InternVlService::new(front.clone(), metrics.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let mut keys = ApiKeys::new(&config.all_api_keys()?);
    let probe_keys = if config.open_health_and_reflection {
        ApiKeys::open()
    } else {
        keys.clone()
    };
    let http_api = openai::OpenAi::new(
        front,
        keys.clone(),
        metrics,
        openai::model_id(&config.model),
        config.max_message_bytes,
        std::time::Duration::from_secs_f64(config.http_body_timeout_secs),
    );
    let grpc = tonic::service::Routes::new(InterceptedService::new(health, probe_keys.clone()))
        .add_service(InterceptedService::new(reflection, probe_keys))
        // Arrival is stamped before the body is read: deadlines count from it.
        .add_service(InterceptedService::new(service, move |request| {
            keys.call(request).map(service::deadline::stamp_arrival)
        }));
    // One port, two protocols: gRPC by its service paths, the OpenAI API
    // under /v1/ (HTTP/1.1 or HTTP/2).
    let routes = tonic::service::Routes::from(grpc.into_axum_router().merge(http_api.router()));
    Ok((routes, reporter))
}

/// How long a replica whose engine failed waits for its last answers to
/// reach their clients before it exits.
const FAULT_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Ends a background task when the server returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <InternVlServer<InternVlService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
