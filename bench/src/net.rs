//! Client sockets: many loopback source addresses, small WebSocket buffers.
//!
//! A source address gives one client at most ~28k ephemeral ports towards
//! one server port, and sockets of the previous run linger in TIME_WAIT, so
//! connections are spread over many 127.x addresses (all local on Linux),
//! starting at a random /16 per run.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// A `ws://` URL on loopback, split into what the client needs.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: String,
    pub addr: SocketAddr,
}

impl Endpoint {
    /// Only loopback servers: this tool never sends load anywhere else.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("ws://").with_context(|| format!("{url}: only ws:// URLs are supported"))?;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let authority = if authority.starts_with("localhost:") {
            authority.replacen("localhost", "127.0.0.1", 1)
        } else {
            authority.to_string()
        };
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("{url}: expected ws://127.x.y.z:PORT/… (an IP address and a port)"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: refusing a non-loopback server; this tool only loads servers on this machine");
        }
        Ok(Self { url: url.to_string(), addr })
    }
}

/// Source addresses `127.N.x.y` (y in 1..=254): `per_ip` consecutive
/// connections share one address.
#[derive(Clone, Copy, Debug)]
pub struct SourcePool {
    second_octet: u8,
    first_host: u32,
    per_ip: usize,
}

impl SourcePool {
    pub fn new(base: Option<Ipv4Addr>, per_ip: usize) -> Self {
        let base = base.unwrap_or_else(|| {
            // 127.N.0.1 with N in 2..=254 from the clock: a fresh /16 per run.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
            Ipv4Addr::new(127, 2 + (nanos % 253) as u8, 0, 1)
        });
        let [_, second, third, fourth] = base.octets();
        let first_host = u32::from(third) * 254 + u32::from(fourth.clamp(1, 254) - 1);
        Self { second_octet: second, first_host, per_ip: per_ip.max(1) }
    }

    pub fn addr(&self, connection: usize) -> Ipv4Addr {
        let host = (self.first_host + (connection / self.per_ip) as u32) % (256 * 254);
        Ipv4Addr::new(127, self.second_octet, (host / 254) as u8, (host % 254 + 1) as u8)
    }
}

/// Small buffers: the client must stay light next to the server under test.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0).max_message_size(Some(1 << 20))
}

/// TCP from `source`, then the WebSocket upgrade of `url` (which may carry a
/// query). Refused upgrades come back as `tungstenite::Error::Http`.
pub async fn open(endpoint: &Endpoint, url: &str, source: Ipv4Addr, timeout: Duration) -> anyhow::Result<Ws> {
    let attempt = async {
        let socket = TcpSocket::new_v4().context("creating a socket")?;
        socket.set_nodelay(true).context("TCP_NODELAY")?;
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
            .with_context(|| format!("binding the source address {source}"))?;
        let stream = socket.connect(endpoint.addr).await.with_context(|| format!("connecting to {}", endpoint.addr))?;
        let (ws, _response) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
            .await
            .map_err(describe_ws_error)?;
        Ok(ws)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => bail!("no WebSocket connection to {} within {timeout:?}", endpoint.addr),
    }
}

/// A refused upgrade is an HTTP response with a JSON body: show both.
fn describe_ws_error(error: tokio_tungstenite::tungstenite::Error) -> anyhow::Error {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Http(response) => {
            let body = response.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            anyhow::anyhow!("upgrade refused: HTTP {} {body}", response.status().as_u16())
        }
        other => anyhow::Error::new(other).context("WebSocket handshake"),
    }
}

/// A short, countable name for why a connection attempt failed.
pub fn failure_kind(error: &anyhow::Error) -> String {
    for cause in error.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return format!("io: {:?}", io.kind());
        }
    }
    let text = error.to_string();
    if let Some(rest) = text.strip_prefix("upgrade refused: HTTP ") {
        return format!("http {}", rest.split(' ').next().unwrap_or(""));
    }
    text.chars().take(60).collect()
}

/// Raises the soft open-files limit to the hard one (19,900 sockets need it).
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_loopback() {
        assert!(Endpoint::parse("ws://127.0.0.1:8080/v1/ws").is_ok());
        assert!(Endpoint::parse("ws://localhost:8000/connection/websocket").is_ok());
        assert!(Endpoint::parse("ws://10.0.0.1:8080/v1/ws").is_err());
        assert!(Endpoint::parse("wss://127.0.0.1:8080/").is_err());
    }

    #[test]
    fn sources_spread_and_skip_odd_host_bytes() {
        let pool = SourcePool::new(Some(Ipv4Addr::new(127, 9, 0, 254)), 2);
        let ips: Vec<_> = (0..6).map(|i| pool.addr(i)).collect();
        assert_eq!(ips[0], Ipv4Addr::new(127, 9, 0, 254));
        assert_eq!(ips[1], ips[0]);
        assert_eq!(ips[2], Ipv4Addr::new(127, 9, 1, 1));
        assert_eq!(ips[4], Ipv4Addr::new(127, 9, 1, 2));
        let pool = SourcePool::new(None, 1);
        assert!((0..70_000).map(|i| pool.addr(i)).all(|ip| ip.is_loopback() && !matches!(ip.octets()[3], 0 | 255)));
    }
}
