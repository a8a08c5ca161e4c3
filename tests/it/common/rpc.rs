//! `internvl-grpc rpc-server` processes for tests that split a model over
//! ggml RPC devices.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

const BOUND: Duration = Duration::from_secs(60);

/// An `rpc-server` serving its CPU on a free loopback port; killed on drop.
pub struct RpcServer {
    /// `127.0.0.1:PORT`, as `rpc_servers` takes it.
    pub endpoint: String,
    /// The process (a test may kill it).
    pub child: Child,
}

impl RpcServer {
    /// Starts one and waits until it takes connections.
    pub fn start() -> RpcServer {
        let endpoint = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
            .args(["rpc-server", "--listen", &endpoint, "--devices", "CPU"])
            .args(["--threads", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rpc-server starts");
        let mut server = RpcServer { endpoint, child };
        let started = Instant::now();
        while std::net::TcpStream::connect(&server.endpoint).is_err() {
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "rpc-server exited"
            );
            assert!(started.elapsed() < BOUND, "rpc-server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
