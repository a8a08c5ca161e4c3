//! Fetching media URLs (`Image.url`, `Video.url`) under the deployment's policy
//! (`internvl_api::media`), before a request is validated: each URL part
//! gets its bytes in `data`, as if the client had sent them, so fetched
//! bytes meet exactly the limits inline bytes meet.
//!
//! The HTTP client is reqwest (hyper underneath, as tonic; rustls with ring
//! and Mozilla's roots compiled in, as the hub downloads use), told:
//! - to resolve names through [`CheckedResolver`], which drops every address
//!   the policy refuses, so the connection goes to an address that was
//!   checked (no second lookup for a rebinding DNS server to answer);
//! - to follow no redirect itself: [`Fetcher::fetch`] checks each hop as a
//!   new URL, up to `media_max_redirects`;
//! - to use no proxy from the environment, which would bypass those checks.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use internvl_api::config::Config;
use internvl_api::media::{address_class, MediaPolicy, Refusal, Target};
use internvl_api::proto;
use internvl_core::error::{EngineError, MediaFailure};

/// Fetches media URLs for requests.
pub struct Fetcher {
    policy: Arc<MediaPolicy>,
    client: reqwest::Client,
    max_bytes: u64,
    /// Bytes all of a request's fetches may bring in together: what one
    /// message may carry inline (`max_message_bytes`).
    max_total: u64,
    max_fetches: usize,
    max_redirects: u32,
    timeout: Duration,
}

/// The parts of a request whose bytes were fetched, so that an error about
/// those bytes names the URL the client sent rather than `data`.
#[derive(Debug, Default)]
pub struct Fetched {
    parts: Vec<String>,
    bytes: u64,
}

impl Fetched {
    /// `error`, naming `….url` where it named the `….data` of a fetched part.
    pub fn relabel(&self, error: EngineError) -> EngineError {
        let url_of = |field: &str| {
            self.parts
                .iter()
                .find(|part| field.strip_prefix(part.as_str()) == Some(".data"))
                .map(|part| format!("{part}.url"))
        };
        match error {
            EngineError::InvalidArgument { field, message } => match url_of(&field) {
                Some(url) => EngineError::InvalidArgument {
                    field: url,
                    message: format!("the fetched bytes: {message}"),
                },
                None => EngineError::InvalidArgument { field, message },
            },
            EngineError::Media {
                field,
                failure,
                message,
            } => EngineError::Media {
                field: url_of(&field).unwrap_or(field),
                failure,
                message,
            },
            other => other,
        }
    }
}

/// Resolves names for the client, keeping only addresses the policy allows
/// a name to reach: public ones (a private address is allowed only through
/// an entry that names it literally, which is never a name).
struct CheckedResolver;

/// A name that resolved to refused addresses only.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unresolvable(Refusal);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match address_class(addr.ip()) {
                    None => true,
                    Some(class) => {
                        refused.get_or_insert((*addr, class));
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = match refused {
                    Some((addr, class)) => Box::new(Unresolvable(Refusal::Address {
                        host: host.clone(),
                        addr,
                        class,
                    })),
                    None => format!("{host} has no address").into(),
                };
                return Err(error);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

fn failure(field: &str, failure: MediaFailure, message: impl Into<String>) -> EngineError {
    EngineError::Media {
        field: field.to_string(),
        failure,
        message: message.into(),
    }
}

fn refused(field: &str, refusal: Refusal) -> EngineError {
    let kind = match refusal {
        Refusal::Malformed(_) | Refusal::Scheme(_) => MediaFailure::Malformed,
        _ => MediaFailure::Refused,
    };
    failure(field, kind, refusal.to_string())
}

/// The refusal somewhere in `error`'s causes, if the resolver made one.
fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(Unresolvable(refusal)) = e.downcast_ref::<Unresolvable>() {
            return Some(refusal.clone());
        }
        cause = e.source();
    }
    None
}

impl Fetcher {
    /// The fetcher of `config`'s media keys (validated already).
    pub fn new(config: &Config) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let timeout = Duration::from_secs_f64(config.media_fetch_timeout_secs);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(CheckedResolver)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            // No kept connections: fetches are few and to many hosts, and a
            // pooled connection the server has closed fails the next fetch
            // (seen in tests/it/media.rs as "connection reset by peer").
            .pool_max_idle_per_host(0)
            .connect_timeout(timeout)
            .user_agent(concat!("internvl-grpc/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            policy: Arc::new(config.media_policy()?),
            client,
            max_bytes: config.media_max_mb.saturating_mul(1024 * 1024),
            max_total: config.max_message_bytes as u64,
            max_fetches: config.media_max_fetches,
            max_redirects: config.media_max_redirects,
            timeout,
        })
    }

    /// The URL schemes this deployment takes.
    pub fn schemes(&self) -> Vec<&'static str> {
        self.policy.schemes()
    }

    /// Fetches every `Image.url` and `Video.url` of a request's `messages`
    /// into its `data`. An image with both sources is refused here, naming
    /// it; a video's sources are validation's to check.
    pub async fn messages(&self, messages: &mut [proto::Message]) -> Result<Fetched, EngineError> {
        let mut fetched = Fetched::default();
        for (m, message) in messages.iter_mut().enumerate() {
            let field = format!("messages[{m}]");
            self.content(&mut message.content, &field, &mut fetched)
                .await?;
        }
        Ok(fetched)
    }

    /// [`Fetcher::messages`] for an Embed request's inputs.
    pub async fn embed_inputs(
        &self,
        inputs: &mut [proto::EmbedInput],
    ) -> Result<Fetched, EngineError> {
        let mut fetched = Fetched::default();
        for (i, input) in inputs.iter_mut().enumerate() {
            let field = format!("inputs[{i}]");
            self.content(&mut input.content, &field, &mut fetched)
                .await?;
        }
        Ok(fetched)
    }

    /// The media URLs of one content list at `field`.
    async fn content(
        &self,
        content: &mut [proto::Content],
        field: &str,
        fetched: &mut Fetched,
    ) -> Result<(), EngineError> {
        for (c, part) in content.iter_mut().enumerate() {
            // The URL, and where its bytes go.
            let (field, url, data) = match &mut part.part {
                Some(proto::content::Part::Image(image)) => {
                    let field = format!("{field}.content[{c}].image");
                    if !image.url.is_empty() && !image.data.is_empty() {
                        return Err(EngineError::invalid(
                            field,
                            "data and url are both set; send one",
                        ));
                    }
                    (field, &mut image.url, &mut image.data)
                }
                // A video with another source too is left for validation to
                // refuse, unfetched.
                Some(proto::content::Part::Video(video))
                    if video.frames.is_empty() && video.data.is_empty() =>
                {
                    let field = format!("{field}.content[{c}].video");
                    (field, &mut video.url, &mut video.data)
                }
                _ => continue,
            };
            if url.is_empty() {
                continue;
            }
            if fetched.parts.len() >= self.max_fetches {
                return Err(failure(
                    &format!("{field}.url"),
                    MediaFailure::TooLarge,
                    format!(
                        "more than {} media URLs in one request (media_max_fetches)",
                        self.max_fetches
                    ),
                ));
            }
            let url = std::mem::take(url);
            let started = Instant::now();
            // This fetch may bring what is left of the request's total.
            let left = self.max_total.saturating_sub(fetched.bytes);
            let limit = if left < self.max_bytes {
                Limit {
                    bytes: left,
                    key: "max_message_bytes, for all of a request's media",
                }
            } else {
                Limit {
                    bytes: self.max_bytes,
                    key: "media_max_mb",
                }
            };
            *data = self
                .fetch_within(&url, &format!("{field}.url"), &limit)
                .await?;
            fetched.bytes += data.len() as u64;
            tracing::debug!(
                field,
                bytes = data.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "media fetched"
            );
            fetched.parts.push(field);
        }
        Ok(())
    }

    /// The bytes at `url`, checked at every hop; `field` names it in errors.
    pub async fn fetch(&self, url: &str, field: &str) -> Result<Vec<u8>, EngineError> {
        let limit = Limit {
            bytes: self.max_bytes,
            key: "media_max_mb",
        };
        self.fetch_within(url, field, &limit).await
    }

    /// [`Fetcher::fetch`], reading at most `limit`.
    async fn fetch_within(
        &self,
        url: &str,
        field: &str,
        limit: &Limit,
    ) -> Result<Vec<u8>, EngineError> {
        let started = Instant::now();
        let mut current = url.to_string();
        for hop in 0..=self.max_redirects {
            let target = self
                .policy
                .check_url(&current)
                .map_err(|r| refused(field, r))?;
            let (url, host, port) = match target {
                Target::Data(bytes) if hop == 0 => return capped(bytes, field, limit),
                Target::File { root, relative } if hop == 0 => {
                    return read_file(root, relative, field, limit).await
                }
                Target::Remote { url, host, port } => (url, host, port),
                _ => {
                    return Err(failure(
                        field,
                        MediaFailure::Refused,
                        "a redirect may lead only to another http(s) URL",
                    ))
                }
            };
            if let Ok(ip) = host.parse::<IpAddr>() {
                // The client connects to an address in the URL without
                // asking the resolver: check it here.
                self.policy
                    .check_address(&host, SocketAddr::new(ip, port))
                    .map_err(|r| refused(field, r))?;
            }
            let left = self.timeout.saturating_sub(started.elapsed());
            let response = match self.client.get(url.clone()).timeout(left).send().await {
                Ok(response) => response,
                Err(e) => return Err(self.request_error(&e, field)),
            };
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        failure(
                            field,
                            MediaFailure::Unreachable,
                            format!("{status} without a usable Location"),
                        )
                    })?;
                current = url
                    .join(location)
                    .map_err(|e| failure(field, MediaFailure::Malformed, e.to_string()))?
                    .to_string();
                continue;
            }
            if !status.is_success() {
                return Err(failure(
                    field,
                    MediaFailure::Unreachable,
                    format!("the server answered {status}"),
                ));
            }
            return self.body(response, field, limit).await;
        }
        Err(failure(
            field,
            MediaFailure::Unreachable,
            format!(
                "more than {} redirects (media_max_redirects)",
                self.max_redirects
            ),
        ))
    }

    fn request_error(&self, error: &reqwest::Error, field: &str) -> EngineError {
        if let Some(refusal) = refusal_in(error) {
            return refused(field, refusal);
        }
        if error.is_timeout() {
            return failure(
                field,
                MediaFailure::TimedOut,
                format!(
                    "no answer within {:?} (media_fetch_timeout_secs)",
                    self.timeout
                ),
            );
        }
        failure(field, MediaFailure::Unreachable, crate::error_chain(error))
    }

    async fn body(
        &self,
        mut response: reqwest::Response,
        field: &str,
        limit: &Limit,
    ) -> Result<Vec<u8>, EngineError> {
        if response.content_length().is_some_and(|n| n > limit.bytes) {
            return Err(limit.exceeded(field));
        }
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (bytes.len() + chunk.len()) as u64 > limit.bytes {
                        return Err(limit.exceeded(field));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(bytes),
                Err(e) => return Err(self.request_error(&e, field)),
            }
        }
    }
}

/// How many bytes a fetch may read, and the key that says so.
struct Limit {
    bytes: u64,
    key: &'static str,
}

impl Limit {
    fn exceeded(&self, field: &str) -> EngineError {
        failure(
            field,
            MediaFailure::TooLarge,
            format!("more than {} bytes ({})", self.bytes, self.key),
        )
    }
}

fn capped(bytes: Vec<u8>, field: &str, limit: &Limit) -> Result<Vec<u8>, EngineError> {
    if bytes.len() as u64 > limit.bytes {
        return Err(limit.exceeded(field));
    }
    Ok(bytes)
}

/// Reads `relative` beneath `root`: opened with `openat2` and
/// `RESOLVE_BENEATH` from the root's descriptor (no `..`, absolute link or
/// magic link may lead out, whatever was swapped in since the policy's
/// check), non-blocking (a FIFO or device does not hold the open), and
/// read only if it is a regular file.
async fn read_file(
    root: PathBuf,
    relative: PathBuf,
    field: &str,
    limit: &Limit,
) -> Result<Vec<u8>, EngineError> {
    use std::io::Read;
    let max = limit.bytes;
    let opened = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, FileError> {
        let file = open_beneath(&root, &relative)?;
        let mut bytes = Vec::new();
        std::fs::File::from(file)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(FileError::Io)?;
        Ok(bytes)
    })
    .await
    .map_err(|e| EngineError::Fault(format!("reading a media file: {e}")))?;
    match opened {
        Ok(bytes) => capped(bytes, field, limit),
        Err(FileError::Io(e)) => Err(failure(
            field,
            MediaFailure::Unreachable,
            format!("cannot read the file: {e}"),
        )),
        Err(FileError::Outside) => Err(failure(
            field,
            MediaFailure::Refused,
            "the file is outside media_root".to_string(),
        )),
        Err(FileError::NotRegular(kind)) => Err(failure(
            field,
            MediaFailure::Refused,
            format!("not a regular file ({kind}); only files are read under media_root"),
        )),
    }
}

/// Why a file under `media_root` was not read.
enum FileError {
    Io(std::io::Error),
    /// Resolving it led out of the root.
    Outside,
    /// A FIFO, socket, device or directory.
    NotRegular(&'static str),
}

fn open_beneath(root: &Path, relative: &Path) -> Result<rustix::fd::OwnedFd, FileError> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    let io = |e: rustix::io::Errno| FileError::Io(e.into());
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let file = rustix::fs::openat2(
        &dir,
        relative,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| {
        if e == rustix::io::Errno::XDEV {
            FileError::Outside
        } else {
            io(e)
        }
    })?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&file).map_err(io)?.st_mode);
    match kind {
        FileType::RegularFile => Ok(file),
        FileType::Fifo => Err(FileError::NotRegular("a FIFO")),
        FileType::Directory => Err(FileError::NotRegular("a directory")),
        FileType::Socket => Err(FileError::NotRegular("a socket")),
        FileType::CharacterDevice | FileType::BlockDevice => Err(FileError::NotRegular("a device")),
        _ => Err(FileError::NotRegular("not a file")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file checked by the policy, then swapped for a symlink that leads
    /// out of the root before it is opened: the open refuses it (the check
    /// and the open were by name before, so the swap escaped).
    #[test]
    fn a_file_swapped_for_a_symlink_after_its_check_is_not_read() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a.png"), b"inside").unwrap();
        std::fs::write(base.path().join("secret"), b"outside").unwrap();
        let policy = MediaPolicy::new(&[], Some(&root)).unwrap();
        let url = format!("file://{}", root.join("a.png").display());
        let Ok(Target::File { root, relative }) = policy.check_url(&url) else {
            panic!("a file under the root");
        };
        assert!(open_beneath(&root, &relative).is_ok());
        std::fs::remove_file(root.join("a.png")).unwrap();
        std::os::unix::fs::symlink(base.path().join("secret"), root.join("a.png")).unwrap();
        assert!(matches!(
            open_beneath(&root, &relative),
            Err(FileError::Outside)
        ));
        // A link that stays inside is followed.
        std::fs::write(root.join("b.png"), b"inside").unwrap();
        std::fs::remove_file(root.join("a.png")).unwrap();
        std::os::unix::fs::symlink("b.png", root.join("a.png")).unwrap();
        assert!(open_beneath(&root, &relative).is_ok());
    }
}
