//! The service in-process on 127.0.0.1:0, for the benches that measure it
//! (a module apart from `common`, which every bench includes, so that the
//! ones that never start a server do not carry it unused).

use std::net::SocketAddr;
use std::time::Duration;

use internvl_grpc::config::Config;
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A running server: where it listens, a client that saw it ready, the
/// sender that stops it, and its task.
pub struct Served {
    // Each bench is its own crate; the HTTP one reads this, the others not.
    #[allow(dead_code)]
    pub addr: SocketAddr,
    pub client: InternVlClient<Channel>,
    pub stop: oneshot::Sender<()>,
    pub server: JoinHandle<Result<(), internvl_grpc::ServeError>>,
}

/// Starts `config` and waits until `GetModelInfo` answers.
pub async fn serve(config: Config) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(internvl_grpc::run(config, listener, async move {
        stopped.await.ok();
    }));
    let client = loop {
        if let Ok(c) = InternVlClient::connect(format!("http://{addr}")).await {
            if c.clone()
                .get_model_info(proto::GetModelInfoRequest {})
                .await
                .is_ok()
            {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Served {
        addr,
        client,
        stop,
        server,
    }
}
