//! Command line: `serve`, the client commands `generate`, `embed` and `info`
//! that let a person try a running server without writing a client, `health`
//! for probes, and `models`/`pull` for the catalog.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;

use internvl_api::config;
use internvl_api::proto::{self, intern_vl_client::InternVlClient};

/// InternVL3 vision-language models over gRPC.
#[derive(Debug, Parser)]
#[command(name = "internvl-grpc", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over gRPC.
    Serve(Box<ServeArgs>),
    /// Print the configuration's keys and defaults, or check a configuration.
    Config(Box<ConfigArgs>),
    /// Stream a reply from a running server.
    Generate(GenerateArgs),
    /// Embed text and images with a running server.
    Embed(EmbedArgs),
    /// Show what a running server serves.
    Info(ClientArgs),
    /// List the model catalog, marking what is already downloaded.
    Models(HubArgs),
    /// Download a catalog model's two files (NAME or NAME:QUANT).
    Pull(PullArgs),
    /// Probe a server's gRPC health: exit 0 when it answers SERVING, 1
    /// otherwise (for container HEALTHCHECKs; needs no other tool).
    Health(HealthArgs),
    /// List the ggml devices this build finds (the names `devices` takes).
    Devices(DevicesArgs),
    /// Serve this host's ggml devices to a server elsewhere (its
    /// `rpc_servers`), as llama.cpp's rpc-server does. The protocol has no
    /// authentication: private networks only.
    RpcServer(RpcServerArgs),
    /// Run a program under the video decoder's confinement (the server
    /// starts FFmpeg this way; see `media_video_sandbox`).
    #[command(hide = true)]
    Confine(ConfineArgs),
}

/// Flags of `confine` (src/confine.rs).
#[derive(Debug, Args)]
pub struct ConfineArgs {
    /// Address space the program may map, in bytes.
    #[arg(long)]
    pub memory_bytes: u64,
    /// Resource limits only: no Landlock, no seccomp filter.
    #[arg(long)]
    pub limits_only: bool,
    /// The program, by path, and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<std::ffi::OsString>,
}

impl ConfineArgs {
    /// The run these flags ask for.
    pub fn request(self) -> crate::confine::Request {
        let mut command = self.command.into_iter();
        crate::confine::Request {
            memory_bytes: self.memory_bytes,
            limits_only: self.limits_only,
            program: command.next().unwrap_or_default().into(),
            args: command.collect(),
        }
    }
}

/// Flags of `devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Also list the devices of these RPC servers (host:port, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub rpc_servers: Vec<String>,
    /// Vulkan devices ggml may use, by index in Vulkan's list (printed
    /// first), comma separated: the service's `vulkan_devices`.
    #[arg(long, value_delimiter = ',')]
    pub vulkan_devices: Vec<u32>,
}

/// Flags of `rpc-server`.
#[derive(Debug, Args)]
pub struct RpcServerArgs {
    /// Address to serve on (host:port). Anyone who reaches it can run
    /// anything on these devices and read their memory: bind a private
    /// address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub listen: String,
    /// Devices to serve, comma separated (default: every GPU, else the CPU).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Vulkan devices ggml may use, by index in Vulkan's list (see
    /// `devices`), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub vulkan_devices: Vec<u32>,
    /// CPU threads, when the CPU is served (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `devices`: prints Vulkan's device list where the build has Vulkan, then
/// each device ggml finds.
pub fn devices(args: DevicesArgs) -> ClientResult {
    if let Ok(listed) = crate::engine::vulkan_devices() {
        println!("Vulkan's devices (vulkan_devices takes the index):");
        for d in &listed {
            println!("  {:<3} {:<10} {}", d.index, d.kind, d.name);
        }
        println!("ggml's devices:");
    }
    let devices = crate::engine::devices(&args.rpc_servers, &args.vulkan_devices)?;
    for d in devices {
        println!(
            "{:<10} {:<5} {} ({} MiB, {} MiB free)",
            d.name,
            d.kind.name(),
            d.description,
            d.memory_total / (1024 * 1024),
            d.memory_free / (1024 * 1024)
        );
    }
    Ok(())
}

/// `rpc-server`: serves devices until killed.
pub fn rpc_server(args: RpcServerArgs) -> ClientResult {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    crate::engine::serve_rpc(&args.listen, &args.devices, &args.vulkan_devices, threads)?;
    Ok(())
}

/// Flags of `health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Server address: host:port (plain TCP, as grpc-health-probe takes it),
    /// http://host:port, or https://host:port for TLS.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Service to ask about: "" is the whole server, `internvl.v1.InternVL` the model service.
    #[arg(long, default_value = "")]
    pub service: String,
    /// CA certificate (PEM) that signed the server's certificate (https:// only).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require one (mutual TLS).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client certificate's key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the address's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Seconds to wait for the answer, connecting included.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
}

/// Where hub files are cached.
#[derive(Debug, Args)]
pub struct HubArgs {
    /// Hugging Face cache directory (default: HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(long)]
    pub hf_cache: Option<PathBuf>,
}

/// Flags of `pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Catalog name, optionally with a quantization: internvl3.5-2b:q4_k_m.
    pub name: String,
    /// Cache.
    #[command(flatten)]
    pub hub: HubArgs,
}

/// Flags of `serve` and `config --check`: `--config FILE`, then every
/// configuration key as a flag (`--n-ctx 4096`) and `--set key=value`. Each
/// overrides the file and the environment. The key flags are made from the
/// configuration's schema ([`internvl_api::config::keys`]), so no list of
/// keys is written here.
#[derive(Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file.
    pub config: Option<PathBuf>,
    /// `(key, value)` as the command line wrote them.
    pub settings: Vec<(String, String)>,
}

/// `--set`'s `key=value`, with a key the schema has.
fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    let key = key.trim();
    match config::key(key) {
        Some(_) => Ok((key.to_string(), value.to_string())),
        None => Err(format!(
            "{key:?} is no configuration key (`internvl-grpc config --print` lists them)"
        )),
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(file) = matches.get_one::<PathBuf>("config") {
            self.config = Some(file.clone());
        }
        let mut settings: Vec<(String, String)> = config::keys()
            .iter()
            .filter_map(|key| {
                let value = matches.get_one::<String>(key.name.as_str())?;
                Some((key.name.clone(), value.clone()))
            })
            .collect();
        settings.extend(
            matches
                .get_many::<(String, String)>("set")
                .into_iter()
                .flatten()
                .cloned(),
        );
        let mut seen = std::collections::HashSet::new();
        if let Some((key, _)) = settings.iter().find(|(key, _)| !seen.insert(key)) {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                format!("the key {key} is set twice on the command line\n"),
            ));
        }
        self.settings = settings;
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        let mut cmd = cmd
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML configuration file (`internvl-grpc config --print` writes one)"),
            )
            .arg(
                Arg::new("set")
                    .long("set")
                    .value_name("KEY=VALUE")
                    .action(ArgAction::Append)
                    .value_parser(parse_setting)
                    .help("Sets any configuration key, as its flag does"),
            );
        for key in config::keys() {
            let mut help = key.summary().to_string();
            if let config::ValueKind::Choice(choices) = &key.kind {
                help.push_str(&format!(" [{}]", choices.join(", ")));
            }
            let mut arg = Arg::new(key.name.clone())
                .long(key.flag())
                .help(help)
                .long_help(key.description.clone());
            // A flag alone turns a boolean on; other values may be negative
            // (`--n-gpu-layers -1`), which only a required value can take
            // without eating the next flag.
            arg = match key.kind {
                config::ValueKind::Bool => arg
                    .value_name("BOOL")
                    .num_args(0..=1)
                    .default_missing_value("true"),
                config::ValueKind::List => arg.value_name("A,B,…").allow_hyphen_values(true),
                _ => arg.value_name("VALUE").allow_hyphen_values(true),
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Flags of `config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Write every key with its description and default, as TOML that
    /// loads as the defaults.
    #[arg(long, conflicts_with = "check")]
    pub print: bool,
    /// With --print: the README's Markdown table instead.
    #[arg(long, requires = "print")]
    pub markdown: bool,
    /// Merge the file, the environment and the flags as `serve` does, check
    /// every value, and write the result (exit 1 naming each wrong key).
    #[arg(long)]
    pub check: bool,
    /// What `serve` would be given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `config`: the defaults, or a check of what `serve` would run with.
pub fn config(args: ConfigArgs) -> ClientResult {
    if args.print {
        if args.markdown {
            print!("{}", config::markdown_table());
        } else {
            print!("{}", config::defaults_toml());
        }
        return Ok(());
    }
    if !args.check {
        return Err("say --print (the defaults) or --check (what serve would run with)".into());
    }
    let mut loaded = config::Config::load(args.serve.config.as_deref(), &args.serve.settings)?;
    // What is printed lands in terminals and CI logs: not the keys themselves.
    for key in &mut loaded.api_keys {
        *key = "<redacted>".into();
    }
    print!("{}", loaded.to_toml());
    Ok(())
}

/// `addr` as a URI: `host:port` (as grpc-health-probe's `-addr` takes it)
/// is plain TCP, `http://host:port` too; `https://` selects TLS.
pub fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Where the server is.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Server address: host:port, or http:// or https:// before it.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
}

/// Flags of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Image file to show the model (repeat for several).
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// The question.
    pub prompt: String,
}

/// Flags of `embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Image placed before the text.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Scale to unit length.
    #[arg(long)]
    pub normalize: bool,
    /// Text to embed.
    #[arg(default_value = "")]
    pub text: String,
}

type ClientResult = Result<(), Box<dyn std::error::Error>>;

async fn connect(
    args: &ClientArgs,
) -> Result<InternVlClient<tonic::transport::Channel>, Box<dyn std::error::Error>> {
    Ok(InternVlClient::connect(uri(&args.addr))
        .await?
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

fn image_part(path: &PathBuf) -> Result<proto::Content, std::io::Error> {
    Ok(proto::Content {
        part: Some(proto::content::Part::Image(proto::Image {
            data: std::fs::read(path)?,
            max_tiles: 0,
            min_tiles: 0,
            ..Default::default()
        })),
    })
}

fn text_part(text: String) -> proto::Content {
    proto::Content {
        part: Some(proto::content::Part::Text(text)),
    }
}

/// `generate`: streams the reply to stdout, then usage to stderr.
pub async fn generate(args: GenerateArgs) -> ClientResult {
    let mut client = connect(&args.client).await?;
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(proto::Message {
            role: "system".into(),
            content: vec![text_part(system)],
        });
    }
    let mut content = args
        .image
        .iter()
        .map(image_part)
        .collect::<Result<Vec<_>, _>>()?;
    content.push(text_part(args.prompt));
    messages.push(proto::Message {
        role: "user".into(),
        content,
    });
    let request = proto::GenerateRequest {
        messages,
        sampling: Some(proto::SamplingParams {
            temperature: args.temperature,
            ..Default::default()
        }),
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    let mut stdout = std::io::stdout();
    while let Some(response) = stream.next().await {
        match response?.event {
            Some(proto::generate_response::Event::Delta(delta)) => {
                stdout.write_all(delta.text.as_bytes())?;
                stdout.flush()?;
            }
            Some(proto::generate_response::Event::Done(done)) => {
                let reason = proto::FinishReason::try_from(done.finish_reason)
                    .map_or("unknown", |r| r.as_str_name());
                let usage = done.usage.unwrap_or_default();
                let timings = done.timings.unwrap_or_default();
                writeln!(stdout)?;
                eprintln!(
                    "[{reason}] prompt {} tokens ({} image), completion {}, ttft {:.0} ms, decode {:.0} ms",
                    usage.prompt_tokens, usage.image_tokens, usage.completion_tokens, timings.ttft_ms, timings.decode_ms
                );
            }
            None => {}
        }
    }
    Ok(())
}

/// `embed`: prints the vector as JSON.
pub async fn embed(args: EmbedArgs) -> ClientResult {
    let mut client = connect(&args.client).await?;
    let mut content = Vec::new();
    if let Some(image) = &args.image {
        content.push(image_part(image)?);
    }
    if !args.text.is_empty() {
        content.push(text_part(args.text));
    }
    let response = client
        .embed(proto::EmbedRequest {
            inputs: vec![proto::EmbedInput { content }],
            normalize: args.normalize,
            ..Default::default()
        })
        .await?
        .into_inner();
    for e in response.embeddings {
        println!(
            "{}",
            serde_json::json!({ "tokens": e.tokens, "values": e.values })
        );
    }
    Ok(())
}

/// `health`: asks `grpc.health.v1.Health/Check`; prints the status and
/// succeeds only on SERVING.
pub async fn health(args: HealthArgs) -> ClientResult {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err("--timeout must be a positive number of seconds".into());
    }
    let timeout = std::time::Duration::from_secs_f64(args.timeout);
    let mut endpoint = Endpoint::from_shared(uri(&args.addr))
        .map_err(|e| format!("--addr {}: {e}", args.addr))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let tls_flags = args.tls_ca.is_some() || args.tls_cert.is_some() || args.tls_domain.is_some();
    if args.addr.starts_with("https://") {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let ca = args
            .tls_ca
            .as_ref()
            .ok_or("an https:// address needs --tls-ca (the CA that signed the server)")?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &args.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    } else if tls_flags {
        return Err("TLS flags need an https:// address".into());
    }
    let channel = endpoint.connect().await.map_err(|e| {
        format!(
            "cannot connect to {}: {}",
            args.addr,
            crate::error_chain(&e)
        )
    })?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|status| format!("health check failed: {status}"))?
        .into_inner();
    let status = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("{} is {}", describe(&args.service), status.as_str_name()).into())
    }
}

fn describe(service: &str) -> String {
    if service.is_empty() {
        "the server".into()
    } else {
        format!("service {service:?}")
    }
}

/// `info`: prints the model description.
pub async fn info(args: ClientArgs) -> ClientResult {
    let mut client = connect(&args).await?;
    let info = client
        .get_model_info(proto::GetModelInfoRequest {})
        .await?
        .into_inner();
    println!("name:          {}", info.name);
    println!(
        "architecture:  {} ({})",
        info.architecture, info.quantization
    );
    println!(
        "context:       {} (trained {})",
        info.context_size, info.training_context_size
    );
    println!("vocabulary:    {}", info.vocab_size);
    println!("embedding:     {}", info.embedding_size);
    println!(
        "tiles:         {} px, {}..={} per image, {} tokens each ({})",
        info.tile_size, info.min_tiles, info.max_tiles, info.image_tokens_per_tile, info.projector
    );
    println!("offload:       {}", info.offload);
    println!("parallel:      {} sequences", info.parallel);
    println!("media URLs:    {}", info.media_schemes.join(", "));
    match info.video_files.unwrap_or_default() {
        v if v.enabled => println!("video files:   on, {} ({})", v.confinement, v.detail),
        v => println!("video files:   off: {}", v.detail),
    }
    Ok(())
}

fn hub_options(args: &HubArgs) -> crate::models::HubOptions {
    crate::models::HubOptions {
        cache_dir: args.hf_cache.clone(),
        offline: false,
        endpoint: None,
    }
}

/// `models`: one line per catalog entry; quantizations already in the cache
/// (or bundled) are marked.
pub fn models(args: HubArgs) -> ClientResult {
    let hub = hub_options(&args);
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{:<18} {:<12} {:<8} QUANTIZATIONS (RAM GB, what pull checks; * = downloaded, default first)  [REPOSITORY; MMPROJ CHECK]",
        "NAME", "FAMILY", "SIZE"
    )?;
    for entry in internvl_api::catalog::entries() {
        let mmproj = crate::models::cached(entry, &entry.mmproj, &hub).is_some();
        let mut quants: Vec<(&String, &internvl_api::catalog::Quant)> =
            entry.quants.iter().collect();
        quants.sort_by_key(|(name, _)| **name != entry.default_quant);
        let shown: Vec<String> = quants
            .iter()
            .map(|(name, q)| {
                let have = mmproj && crate::models::cached(entry, &q.file, &hub).is_some();
                format!(
                    "{name}{} ({:.1}, {})",
                    if have { "*" } else { "" },
                    q.ram_gb,
                    q.file.verification().label()
                )
            })
            .collect();
        let source = entry
            .repo
            .as_deref()
            .or(entry.bundled.as_deref())
            .unwrap_or_default();
        writeln!(
            out,
            "{:<18} {:<12} {:<8} {}  [{source}; mmproj {}]",
            entry.name,
            entry.family,
            entry.parameters.split(' ').next().unwrap_or_default(),
            shown.join(" "),
            entry.mmproj.verification().label(),
        )?;
    }
    writeln!(
        out,
        "sha256: pull checks the bytes against the catalog's hash; size: their size; \
         unverified: the name follows the publisher's naming but was not seen in a listing \
         (pull fails naming the file if the hub has none)"
    )?;
    Ok(())
}

/// `pull`: downloads a catalog model's language file and mmproj.
pub fn pull(args: PullArgs) -> ClientResult {
    let paths = crate::models::pull(&args.name, &hub_options(&args.hub))?;
    println!("{}", paths.model.display());
    println!("{}", paths.mmproj.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_scheme_is_plain_tcp() {
        assert_eq!(uri("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(uri("[::1]:50051"), "http://[::1]:50051");
        assert_eq!(uri("http://host:1"), "http://host:1");
        assert_eq!(uri("https://host:1"), "https://host:1");
    }
}
