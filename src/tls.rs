//! TLS for the one port, done here rather than by tonic: tonic's acceptor
//! offers only `h2` in ALPN, which turns away every HTTP/1.1 client of the
//! OpenAI-compatible API (OpenAI's Python SDK among them). This acceptor
//! offers `h2` and `http/1.1`, and otherwise does what tonic's did: the
//! PEM identity, client certificates required when `tls_client_ca` is set,
//! ring as the provider, a bounded handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::Config;
use crate::ServeError;

/// A client that has not finished its handshake in this long is dropped,
/// so a silent connection cannot hold an accept slot.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED: usize = 64;

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Tls {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })
}

fn bad(path: &Path, message: impl std::fmt::Display) -> ServeError {
    ServeError::Tls {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The server's TLS settings from the configured PEM files; `None` without
/// `tls_cert` and `tls_key`.
pub fn server_config(config: &Config) -> Result<Option<Arc<ServerConfig>>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| bad(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e))?;
    let builder = match &config.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for root in CertificateDer::pem_slice_iter(&read(ca)?) {
                roots
                    .add(root.map_err(|e| bad(ca, e))?)
                    .map_err(|e| bad(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| bad(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(cert, e))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
}

/// The TLS connections of `listener`: each handshake on its own task, so a
/// slow client holds back only itself. Ends when `listener` fails.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (accepted, connections) = tokio::sync::mpsc::channel(ACCEPTED);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Nagle off, as for plaintext (benches/README.md).
            let _ = socket.set_nodelay(true);
            let (acceptor, handed) = (acceptor.clone(), accepted.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = handed.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if accepted.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(connections)
}
