//! TLS, mutual TLS and API keys, with certificates made for the test.

use crate::common;

use common::*;
use internvl_grpc::service::proto::{self, intern_vl_client::InternVlClient};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

struct Pki {
    /// Removed when the test ends.
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

/// A CA, a server and a client certificate in a directory of their own
/// (`name` keeps tests running at once apart).
fn pki(name: &str) -> Pki {
    let dir = tempfile::Builder::new()
        .prefix(&format!("internvl-pki-{name}-"))
        .tempdir()
        .unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: with rcgen's one default name for all three,
    // OpenSSL (Python's ssl) takes the leaf for self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "internvl test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["client".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client");
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("client.pem"), client_cert.pem()).unwrap();
    std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_pem: ca_cert.pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// The tiny model served over TLS with `pki`'s server certificate, requiring
/// client certificates its CA signed.
fn mutual_tls(pki: &Pki) -> internvl_grpc::config::Config {
    let mut config = tiny_config();
    config.tls_cert = Some(pki.dir.path().join("server.pem"));
    config.tls_key = Some(pki.dir.path().join("server.key"));
    config.tls_client_ca = Some(pki.dir.path().join("ca.pem"));
    config
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    with_client_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(
            &pki.client_cert_pem,
            &pki.client_key_pem,
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn with_key(key: Option<&str>) -> tonic::Request<proto::GetModelInfoRequest> {
    let mut request = tonic::Request::new(proto::GetModelInfoRequest {});
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_api_keys() {
    let pki = pki("mtls");
    let mut config = mutual_tls(&pki);
    config.api_keys = vec!["first-key".into(), "second-key".into()];
    let server = start_unready(config).await;
    let addr = server.addr;

    // With a client certificate and a valid key: served (once the model is loaded).
    let channel = tls_channel(addr, &pki, true).await.expect("mTLS handshake");
    let mut client = InternVlClient::new(channel.clone());
    let mut info = None;
    for _ in 0..200 {
        match client.get_model_info(with_key(Some("second-key"))).await {
            Ok(r) => {
                info = Some(r.into_inner());
                break;
            }
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!(info.expect("ready").vocab_size, 4026);

    // API keys: missing or wrong is UNAUTHENTICATED; health stays open for probes.
    for key in [None, Some("wrong-key"), Some("first-ke")] {
        let status = client.get_model_info(with_key(key)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}: {status:?}");
    }
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");

    // Without a client certificate, or without TLS, nothing gets through.
    let served_without_cert = match tls_channel(addr, &pki, false).await {
        Ok(channel) => InternVlClient::new(channel)
            .get_model_info(with_key(Some("first-key")))
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(
        !served_without_cert,
        "a client without a certificate was served"
    );
    let served_plaintext = match InternVlClient::connect(format!("http://{addr}")).await {
        Ok(mut c) => c.get_model_info(with_key(Some("first-key"))).await.is_ok(),
        Err(_) => false,
    };
    assert!(!served_plaintext, "a plaintext client was served");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_probe_speaks_mutual_tls() {
    let pki = pki("probe");
    let config = mutual_tls(&pki);
    let server = start_unready(config).await;
    let path = |name: &str| pki.dir.path().join(name).display().to_string();
    let probe = |extra: Vec<String>| {
        let mut args = vec![
            "health".to_string(),
            "--addr".into(),
            format!("https://{}", server.addr),
            "--tls-ca".into(),
            path("ca.pem"),
            "--tls-domain".into(),
            "localhost".into(),
        ];
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_internvl-grpc"))
            .args(args)
            .output()
            .expect("the binary runs")
    };
    let with_cert = || {
        probe(vec![
            "--tls-cert".into(),
            path("client.pem"),
            "--tls-key".into(),
            path("client.key"),
        ])
    };
    // NOT_SERVING until the model is loaded, then SERVING.
    let mut out = with_cert();
    for _ in 0..400 {
        if out.status.success() {
            break;
        }
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "NOT_SERVING");
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = with_cert();
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    // Without a client certificate the server refuses the handshake.
    let out = probe(vec![]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    server.stop().await;
}

/// The one TLS port serves the OpenAI-compatible API to HTTP/1.1 clients
/// too (tonic's own acceptor offered only h2 in ALPN, which refused them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_over_tls_takes_http1_clients() {
    let pki = pki("openai-tls");
    let mut config = tiny_config();
    config.tls_cert = Some(pki.dir.path().join("server.pem"));
    config.tls_key = Some(pki.dir.path().join("server.key"));
    let server = start_unready(config).await;
    // Ready once gRPC, over the same TLS port, answers.
    let channel = tls_channel(server.addr, &pki, false).await.unwrap();
    let mut client = InternVlClient::new(channel);
    let mut ready = false;
    for _ in 0..400 {
        match client.get_model_info(with_key(None)).await {
            Ok(_) => {
                ready = true;
                break;
            }
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert!(ready, "never ready");
    let summary = run_python_client(
        "openai_tls.py",
        vec![
            format!("https://localhost:{}/v1", server.addr.port()),
            pki.dir.path().join("ca.pem").display().to_string(),
        ],
    )
    .await;
    assert_eq!(summary["completion_tokens"], 3, "{summary}");
    assert_eq!(
        summary["http_versions"],
        serde_json::json!(["HTTP/1.1"]),
        "{summary}"
    );
}
