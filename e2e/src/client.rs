//! A minimal WebSocket chat client for load: it connects with a token
//! signed by the cluster's key, waits for `hello`, then heartbeats until it
//! is dropped (which closes the connection).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kubechat_gateway::transport::auth::Authenticator;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Mints client tokens with a ChatCluster's signing key.
pub struct Tokens(Authenticator);

impl Tokens {
    /// `key`: the signing key as the Secret holds it.
    pub fn new(key: &[u8]) -> Self {
        Self(Authenticator::new(key).unwrap_or_else(|e| panic!("the signing key is unusable: {e}")))
    }

    pub fn mint(&self, user: &str, device: &str) -> String {
        self.0.mint(user, device, 3600).unwrap_or_else(|e| panic!("minting a token for {user}: {e}"))
    }
}

/// One open connection; dropping it closes the connection.
pub struct LoadClient {
    task: JoinHandle<()>,
}

impl LoadClient {
    /// Connects to `url` (`ws://…/v1/ws`) and waits for `hello`.
    pub async fn connect(url: &str, token: &str, heartbeat: Duration) -> Result<Self, String> {
        let request = format!("{url}?token={token}");
        let (mut socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| format!("connecting to {url} timed out"))?
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let hello =
            tokio::time::timeout(CONNECT_TIMEOUT, socket.next()).await.map_err(|_| format!("no hello from {url}"))?;
        match hello {
            Some(Ok(Message::Text(text))) if text.contains(r#""type":"hello""#) => {}
            other => return Err(format!("expected hello from {url}, got {other:?}")),
        }
        let task = tokio::spawn(async move {
            let mut beat = tokio::time::interval(heartbeat);
            loop {
                tokio::select! {
                    _ = beat.tick() => {
                        if socket.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await.is_err() {
                            return;
                        }
                    }
                    // Read (and ignore) whatever the server sends, so it never piles up.
                    frame = socket.next() => if matches!(frame, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                        return;
                    },
                }
            }
        });
        Ok(Self { task })
    }

    /// The connection ended (the server closed it or it broke).
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
