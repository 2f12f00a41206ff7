//! The two servers' client protocols behind one small interface: connect and
//! authenticate, set up (groups, subscriptions), encode a send, and classify
//! what arrives.

pub mod centrifugo;
pub mod kubechat;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, Endpoint, Ws};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Server {
    Kubechat,
    Centrifugo,
}

/// Where one sender's messages go.
#[derive(Clone, Debug)]
pub enum Target {
    /// One user: kubechat `to.user`, or the user's personal Centrifugo channel.
    User(String),
    /// A group: kubechat `to.group` with its id, or the group's Centrifugo channel.
    Group(String),
}

/// A received control frame (anything that is not a delivery).
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    /// The reply to request `req` succeeded (kubechat `ack`, Centrifugo publish reply).
    Ack(u32),
    /// The request failed, or (without `req`) the server reported an error.
    Error(Option<u32>, String),
    /// Centrifugo's application-level ping: answer with `{}`.
    Ping,
    Other,
}

/// Everything a connection needs to speak one server's protocol.
#[derive(Clone, Debug)]
pub struct Client {
    pub server: Server,
    pub key: Vec<u8>,
    pub timeout: Duration,
}

/// First request id a workload uses; lower ones are for setup.
pub const FIRST_REQ: u32 = 100;

impl Client {
    /// Opens and authenticates one connection as `user`/`device`.
    pub async fn connect(&self, endpoint: &Endpoint, source: Ipv4Addr, user: &str, device: &str) -> anyhow::Result<Ws> {
        let token = token(&self.key, user, device)?;
        let attempt = async {
            match self.server {
                Server::Kubechat => {
                    let url = kubechat::url_with_token(&endpoint.url, &token);
                    let mut ws = net::open(endpoint, &url, source, self.timeout).await?;
                    kubechat::await_hello(&mut ws).await?;
                    Ok(ws)
                }
                Server::Centrifugo => {
                    let mut ws = net::open(endpoint, &endpoint.url, source, self.timeout).await?;
                    centrifugo::authenticate(&mut ws, &token).await?;
                    Ok(ws)
                }
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => bail!("not authenticated by {} within {:?}", endpoint.addr, self.timeout),
        }
    }

    /// The frame that sends `text` to `target` as request `req`.
    pub fn send_frame(&self, target: &Target, req: u32, key_prefix: &str, text: &str) -> String {
        match self.server {
            Server::Kubechat => kubechat::send_frame(target, req, key_prefix, text),
            Server::Centrifugo => centrifugo::publish_frame(&centrifugo::channel(target), req, text),
        }
    }

    /// The frame to send every heartbeat interval, if the protocol has one
    /// (Centrifugo's server pings instead, answered in [`Client::pong`]).
    pub fn heartbeat(&self) -> Option<&'static str> {
        match self.server {
            Server::Kubechat => Some(kubechat::HEARTBEAT),
            Server::Centrifugo => None,
        }
    }

    pub fn pong(&self) -> &'static str {
        centrifugo::PONG
    }

    /// Classifies one line of a received text frame that carries no stamp.
    pub fn control(&self, line: &str) -> Control {
        match self.server {
            Server::Kubechat => kubechat::control(line),
            Server::Centrifugo => centrifugo::control(line),
        }
    }

    /// Does the sender of a group message also receive it? (Centrifugo: a
    /// subscriber's own publication is delivered to it; kubechat acks instead.)
    pub fn delivers_to_sender(&self) -> bool {
        self.server == Server::Centrifugo
    }
}

/// An HS256 token with the claims both servers read (`sub`; `dev` is the
/// kubechat device, ignored by Centrifugo).
pub fn token(key: &[u8], user: &str, device: &str) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        dev: &'a str,
        exp: u64,
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = Claims { sub: user, dev: device, exp: now + 86_400 };
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(key)).context("signing a token")
}

/// Sends `request`, then reads text frames until `answer` returns a result,
/// answering pings meanwhile. For setup steps, not for the measured loop.
pub async fn request<T>(
    ws: &mut Ws,
    request: Option<String>,
    what: &str,
    mut answer: impl FnMut(&serde_json::Value) -> Option<anyhow::Result<T>>,
) -> anyhow::Result<T> {
    if let Some(text) = request {
        ws.send(Message::text(text)).await.with_context(|| format!("{what}: sending"))?;
    }
    loop {
        let message = match ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(anyhow::Error::new(e).context(format!("{what}: connection failed"))),
            None => bail!("{what}: connection ended"),
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let (code, reason) =
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((0, String::new()));
                bail!("{what}: the server closed the connection ({code} {reason})");
            }
            _ => continue,
        };
        for line in text.as_str().split('\n').filter(|l| !l.trim().is_empty()) {
            if line.trim() == "{}" {
                ws.send(Message::text(centrifugo::PONG)).await.with_context(|| format!("{what}: answering a ping"))?;
                continue;
            }
            let value: serde_json::Value = match serde_json::from_str(line) {
                Ok(value) => value,
                Err(_) => continue,
            };
            if let Some(result) = answer(&value) {
                return result;
            }
        }
    }
}
