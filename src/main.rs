//! `internvl-grpc`: parses the command line and configuration, sets up
//! tracing, and hands over to the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use internvl_grpc::cli::{self, Cli, Command};
use internvl_grpc::config::Config;
use tracing_subscriber::EnvFilter;

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,llama_cpp_2=warn"));
    // Colour only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    if ctrl_c.await.is_err() {
        std::future::pending::<()>().await;
    }
    tracing::info!("shutting down");
}

async fn serve(args: cli::ServeArgs) -> Result<(), String> {
    let config = Config::load(args.config.as_deref(), &args.settings).map_err(|e| e.to_string())?;
    init_tracing(config.log_json);
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "listening");
    internvl_grpc::run(config, listener, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: the confinement applies to the calling
    // thread, then becomes FFmpeg by exec.
    if let Command::Confine(args) = cli.command {
        let error = internvl_grpc::confine::exec(&args.request());
        eprintln!("internvl-grpc confine: {error}");
        return ExitCode::from(126);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Serve(args) => serve(*args).await,
        Command::Generate(args) => cli::generate(args).await.map_err(|e| e.to_string()),
        Command::Embed(args) => cli::embed(args).await.map_err(|e| e.to_string()),
        Command::Info(args) => cli::info(args).await.map_err(|e| e.to_string()),
        Command::Health(args) => cli::health(args).await.map_err(|e| e.to_string()),
        Command::Config(args) => cli::config(*args).map_err(|e| e.to_string()),
        Command::Models(args) => cli::models(args).map_err(|e| e.to_string()),
        Command::Devices(args) => cli::devices(args).map_err(|e| e.to_string()),
        // Serves until the process ends, on a thread of ggml's own.
        Command::RpcServer(args) => {
            init_tracing(false);
            tokio::task::spawn_blocking(move || cli::rpc_server(args).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(format!("rpc-server panicked: {e}")))
        }
        // Blocking downloads, off the async runtime's workers.
        Command::Pull(args) => {
            tokio::task::spawn_blocking(move || cli::pull(args).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(format!("pull panicked: {e}")))
        }
        Command::Confine(_) => unreachable!("handled before the runtime starts"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
