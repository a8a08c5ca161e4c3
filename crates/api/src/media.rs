//! Which media URLs a deployment fetches (`media_allow`, `media_root`): the
//! policy alone, without I/O, so every rule is unit-tested and fuzzed. The
//! service's fetcher asks it about the URL, then about each address the
//! host resolves to (and connects only to an address it accepted), then
//! again about every redirect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use url::{Host, Url};

/// Why a URL or an address is not fetched. Each says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a URL.
    #[error("is not a URL: {0}")]
    Malformed(String),
    /// A scheme the service never fetches.
    #[error("scheme {0:?} is not fetched (https, http, data or file)")]
    Scheme(String),
    /// No `media_allow` entry covers it.
    #[error("{0} is not under any media_allow entry of this deployment")]
    NotAllowed(String),
    /// `file://` without a `media_root`.
    #[error("file URLs are not served: this deployment sets no media_root")]
    NoRoot,
    /// `file://` outside `media_root` (after `..` and symlinks).
    #[error("{0} is outside media_root")]
    OutsideRoot(String),
    /// The host resolves to an address the service does not connect to.
    #[error("{host} resolves to {addr}, a {class} address; only a media_allow entry naming that address and port allows it")]
    Address {
        /// The URL's host.
        host: String,
        /// What it resolved to.
        addr: SocketAddr,
        /// Loopback, private, …
        class: &'static str,
    },
}

/// One `media_allow` entry: a URL prefix with scheme, host and port exact,
/// and the path a prefix ending at a `/`.
#[derive(Clone, Debug)]
struct Allowed {
    scheme: String,
    host: Host<String>,
    port: u16,
    /// The prefix's path, ending in `/`.
    path: String,
    /// The path itself when the entry did not end in `/` (`…/cats` covers
    /// `…/cats` and `…/cats/…`; `…/cats/` only what is under it).
    exact: Option<String>,
}

impl Allowed {
    fn parse(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("{text:?}: only https:// and http:// prefixes"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{text:?}: no user or password in a prefix"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{text:?}: no query or fragment in a prefix"));
        }
        let host = url
            .host()
            .ok_or_else(|| format!("{text:?}: has no host"))?
            .to_owned();
        let mut path = url.path().to_string();
        let mut exact = None;
        // A prefix covers whole path segments: `/img` must not let
        // `/img-private/` through.
        if !path.ends_with('/') {
            exact = Some(path.clone());
            path.push('/');
        }
        Ok(Self {
            scheme: url.scheme().to_string(),
            host,
            port: url.port_or_known_default().unwrap_or(0),
            path,
            exact,
        })
    }

    fn covers(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && url.host().map(|h| h.to_owned()).as_ref() == Some(&self.host)
            && url.port_or_known_default() == Some(self.port)
            && (url.path().starts_with(&self.path) || self.exact.as_deref() == Some(url.path()))
    }

    /// The address this entry names literally, if its host is an address.
    fn literal(&self) -> Option<SocketAddr> {
        let ip = match &self.host {
            Host::Ipv4(ip) => IpAddr::V4(*ip),
            Host::Ipv6(ip) => IpAddr::V6(*ip),
            Host::Domain(_) => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

/// Where a checked URL's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Fetch over HTTP(S) from `host:port`, connecting only to addresses
    /// [`MediaPolicy::check_address`] accepts.
    Remote {
        /// The URL, as parsed.
        url: Url,
        /// Its host, as written (a name or an address).
        host: String,
        /// Its port (the scheme's default when none is written).
        port: u16,
    },
    /// The bytes of a `data:` URL.
    Data(Vec<u8>),
    /// A file under `media_root`: the root (resolved) and the file's path
    /// below it (symlinks resolved when checked). The reader opens it
    /// beneath the root's descriptor, so a path swapped for a symlink after
    /// this check still cannot leave the root.
    File {
        /// `media_root`, resolved.
        root: PathBuf,
        /// The file's path relative to `root`.
        relative: PathBuf,
    },
}

/// A deployment's media policy.
#[derive(Clone, Debug, Default)]
pub struct MediaPolicy {
    allow: Vec<Allowed>,
    root: Option<PathBuf>,
}

impl MediaPolicy {
    /// The policy of `media_allow` and `media_root`; an entry that is not a
    /// usable prefix is an error naming it.
    pub fn new(allow: &[String], root: Option<&Path>) -> Result<Self, String> {
        let allow = allow
            .iter()
            .map(|a| Allowed::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            allow,
            root: root.map(Path::to_path_buf),
        })
    }

    /// The URL schemes this deployment takes, for GetModelInfo.
    pub fn schemes(&self) -> Vec<&'static str> {
        let mut schemes = vec!["data"];
        for scheme in ["https", "http"] {
            if self.allow.iter().any(|a| a.scheme == scheme) {
                schemes.push(scheme);
            }
        }
        if self.root.is_some() {
            schemes.push("file");
        }
        schemes
    }

    /// Whether `text` may be fetched, and from where. A `file://` URL is
    /// resolved on disk here (the only I/O: `canonicalize`), so `..` and
    /// symlinks are judged by where they lead.
    pub fn check_url(&self, text: &str) -> Result<Target, Refusal> {
        if text.starts_with("data:") {
            return data_url(text);
        }
        let url = Url::parse(text).map_err(|e| Refusal::Malformed(e.to_string()))?;
        match url.scheme() {
            "https" | "http" => {
                if !self.allow.iter().any(|a| a.covers(&url)) {
                    return Err(Refusal::NotAllowed(redacted(&url)));
                }
                let host = match url.host() {
                    Some(Host::Domain(d)) => d.to_string(),
                    Some(Host::Ipv4(ip)) => ip.to_string(),
                    Some(Host::Ipv6(ip)) => ip.to_string(),
                    None => return Err(Refusal::Malformed("no host".into())),
                };
                let port = url.port_or_known_default().unwrap_or(0);
                Ok(Target::Remote { url, host, port })
            }
            "file" => {
                let root = self.root.as_ref().ok_or(Refusal::NoRoot)?;
                let path = url
                    .to_file_path()
                    .map_err(|()| Refusal::Malformed("not a local file path".into()))?;
                let outside = || Refusal::OutsideRoot(url.path().to_string());
                let root = root.canonicalize().map_err(|_| outside())?;
                let resolved = path.canonicalize().map_err(|_| outside())?;
                match resolved.strip_prefix(&root) {
                    Ok(relative) if !relative.as_os_str().is_empty() => Ok(Target::File {
                        relative: relative.to_path_buf(),
                        root,
                    }),
                    _ => Err(outside()),
                }
            }
            other => Err(Refusal::Scheme(other.to_string())),
        }
    }

    /// Whether the service may connect to `addr`, which `host` resolved to:
    /// any public address, or one an allow entry names literally.
    pub fn check_address(&self, host: &str, addr: SocketAddr) -> Result<(), Refusal> {
        let Some(class) = address_class(addr.ip()) else {
            return Ok(());
        };
        let named = self.allow.iter().any(|a| a.literal() == Some(addr));
        if named {
            return Ok(());
        }
        Err(Refusal::Address {
            host: host.to_string(),
            addr,
            class,
        })
    }
}

/// A URL without user, password, query or fragment, for messages.
fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// The bytes of a `data:` URL (base64 or percent-encoded).
fn data_url(text: &str) -> Result<Target, Refusal> {
    let url = data_url::DataUrl::process(text)
        .map_err(|e| Refusal::Malformed(format!("data URL: {e:?}")))?;
    let (body, _) = url
        .decode_to_vec()
        .map_err(|e| Refusal::Malformed(format!("data URL body: {e:?}")))?;
    Ok(Target::Data(body))
}

/// What kind of address the service does not connect to on a name's word,
/// or `None` for a public one. IPv4 forms inside IPv6 (mapped, compatible,
/// NAT64, 6to4) are judged by the IPv4 address they carry.
pub fn address_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => v4_class(v4),
            None => v6_class(v6),
        },
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud-metadata",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() || a >= 240 => "reserved",
        _ if a == 100 && (64..128).contains(&b) => "shared (carrier-grade NAT)",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol",
        _ if a == 198 && (18..20).contains(&b) => "benchmarking",
        _ if (a, b, c) == (192, 0, 2)
            || (a, b, c) == (198, 51, 100)
            || (a, b, c) == (203, 0, 113) =>
        {
            "documentation"
        }
        _ => return None,
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(match () {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_multicast() => "multicast",
        // AWS's IPv6 instance metadata.
        _ if s[..4] == [0xfd00, 0x0ec2, 0, 0] => "cloud-metadata",
        _ if s[0] & 0xfe00 == 0xfc00 => "private (unique local)",
        _ if s[0] & 0xffc0 == 0xfe80 => "link-local",
        _ if s[0] & 0xffc0 == 0xfec0 => "site-local",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "documentation",
        _ if s[0] == 0x0100 && s[1..4] == [0, 0, 0] => "discard",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one carries: mapped (`::ffff:a.b.c.d`),
/// compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`) or
/// 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> MediaPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        MediaPolicy::new(&allow, None).unwrap()
    }

    #[test]
    fn only_urls_under_an_entry_are_fetched() {
        let p = policy(&["https://images.example.com/cats", "http://127.0.0.1:8080/"]);
        assert!(p.check_url("https://images.example.com/cats/a.jpg").is_ok());
        assert!(p.check_url("https://images.example.com/cats").is_ok());
        // An entry ending in `/` covers what is under it, not itself
        // (found by fuzzing: `…:8080/m?x` passed `…:8080/m/`).
        assert!(p.check_url("http://127.0.0.1:8080").is_ok());
        let dir = policy(&["http://127.0.0.1:8080/m/"]);
        assert!(dir.check_url("http://127.0.0.1:8080/m?x").is_err());
        assert!(dir.check_url("http://127.0.0.1:8080/m/a.png").is_ok());
        for refused in [
            "https://images.example.com/dogs/a.jpg",
            "https://images.example.com/cats-private/a.jpg",
            "https://images.example.com.evil.net/cats/a.jpg",
            "https://images.example.com:8443/cats/a.jpg",
            "http://images.example.com/cats/a.jpg",
            "http://127.0.0.1:8081/a.png",
            "http://localhost:8080/a.png",
        ] {
            assert!(
                matches!(p.check_url(refused), Err(Refusal::NotAllowed(_))),
                "{refused}"
            );
        }
        assert!(matches!(
            p.check_url("ftp://images.example.com/cats/a.jpg"),
            Err(Refusal::Scheme(_))
        ));
        assert!(matches!(
            p.check_url("gopher://x/"),
            Err(Refusal::Scheme(_))
        ));
        // Nothing listed: remote fetching is off.
        assert!(matches!(
            policy(&[]).check_url("https://images.example.com/cats/a.jpg"),
            Err(Refusal::NotAllowed(_))
        ));
    }

    #[test]
    fn a_refusal_does_not_repeat_credentials_or_queries() {
        let p = policy(&["https://images.example.com/"]);
        let e = p
            .check_url("https://user:secret@other.example.com/a.jpg?token=abc")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret") && !e.contains("token"), "{e}");
    }

    #[test]
    fn bad_prefixes_are_refused_naming_them() {
        for bad in [
            "images.example.com",
            "ftp://x/",
            "https://u:p@x/",
            "https://x/?q=1",
        ] {
            let e = MediaPolicy::new(&[bad.to_string()], None).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn private_addresses_are_refused_in_every_spelling() {
        let p = policy(&["https://images.example.com/"]);
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "224.0.0.1",
            "100.64.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 443);
            assert!(
                matches!(
                    p.check_address("images.example.com", addr),
                    Err(Refusal::Address { .. })
                ),
                "{ip}"
            );
        }
        for ip in [
            "93.184.215.14",
            "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
            "::ffff:8.8.8.8",
        ] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 443);
            assert!(p.check_address("images.example.com", addr).is_ok(), "{ip}");
        }
    }

    #[test]
    fn a_literal_entry_allows_its_own_address_and_port_only() {
        let p = policy(&["http://127.0.0.1:8080/", "http://[::1]:9000/media/"]);
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(p.check_address("127.0.0.1", at("127.0.0.1:8080")).is_ok());
        assert!(p.check_address("::1", at("[::1]:9000")).is_ok());
        assert!(p.check_address("127.0.0.1", at("127.0.0.1:8081")).is_err());
        // A name that resolves to the listed address is still a name.
        assert!(p.check_url("http://localhost:8080/a.png").is_err());
    }

    #[test]
    fn data_urls_give_their_bytes() {
        let p = policy(&[]);
        assert_eq!(
            p.check_url("data:image/png;base64,AAEC").unwrap(),
            Target::Data(vec![0, 1, 2])
        );
        assert!(matches!(
            p.check_url("data:image/png;base64,!!!"),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn file_urls_stay_under_the_root_through_dots_and_symlinks() {
        let base = std::env::temp_dir().join(format!("internvl-media-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.png"), b"x").unwrap();
        std::fs::write(base.join("secret.png"), b"x").unwrap();
        let _ = std::fs::remove_file(root.join("link.png"));
        std::os::unix::fs::symlink(base.join("secret.png"), root.join("link.png")).unwrap();
        let p = MediaPolicy::new(&[], Some(&root)).unwrap();
        let url = |path: &Path| format!("file://{}", path.display());
        assert!(matches!(
            p.check_url(&url(&root.join("sub/a.png"))),
            Ok(Target::File { .. })
        ));
        for outside in [
            url(&base.join("secret.png")),
            format!("{}/sub/../../secret.png", url(&root)),
            url(&root.join("link.png")),
            url(&root),
        ] {
            assert!(
                matches!(p.check_url(&outside), Err(Refusal::OutsideRoot(_))),
                "{outside}"
            );
        }
        assert_eq!(
            policy(&[]).check_url(&url(&root.join("sub/a.png"))),
            Err(Refusal::NoRoot)
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn schemes_follow_the_deployment() {
        assert_eq!(policy(&[]).schemes(), ["data"]);
        assert_eq!(policy(&["https://a.example/"]).schemes(), ["data", "https"]);
    }
}
