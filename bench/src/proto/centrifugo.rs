//! Centrifugo's bidirectional JSON protocol (v2 client protocol, Centrifugo
//! v6): commands `{"id":N,"connect"|"subscribe"|"publish":{…}}`, replies with
//! the same id, pushes `{"push":{"channel":…,"pub":{"data":…}}}`. The server
//! may put several replies and pushes in one WebSocket frame, one per line.
//! A reply `{}` is a ping, answered with the empty command `{}`.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Control, Target, request};
use crate::net::Ws;

pub const PONG: &str = "{}";

/// Personal channel of a user, or the channel of a group. No `:` (namespace
/// boundary), `#` (user boundary) or `$` (private prefix) in the names.
pub fn channel(target: &Target) -> String {
    match target {
        Target::User(user) => format!("u.{user}"),
        Target::Group(group) => format!("g.{group}"),
    }
}

pub async fn authenticate(ws: &mut Ws, token: &str) -> anyhow::Result<()> {
    let connect = format!(r#"{{"id":1,"connect":{{"token":"{token}","name":"kubechat-bench"}}}}"#);
    request(ws, Some(connect), "connect", |reply| {
        if reply["id"] != 1 {
            return None;
        }
        Some(match (reply.get("connect"), reply.get("error")) {
            (Some(_), _) => Ok(()),
            (_, Some(error)) => Err(anyhow::anyhow!("connect refused: {error}")),
            _ => Err(anyhow::anyhow!("unexpected connect reply: {reply}")),
        })
    })
    .await
}

pub async fn subscribe(ws: &mut Ws, channel: &str) -> anyhow::Result<()> {
    let command = format!(r#"{{"id":2,"subscribe":{{"channel":"{channel}"}}}}"#);
    request(ws, Some(command), "subscribe", |reply| {
        if reply["id"] != 2 {
            return None;
        }
        Some(match reply.get("error") {
            None => Ok(()),
            Some(error) => Err(anyhow::anyhow!("subscribe to {channel} refused: {error}")),
        })
    })
    .await
}

pub fn publish_frame(channel: &str, id: u32, text: &str) -> String {
    format!(r#"{{"id":{id},"publish":{{"channel":"{channel}","data":{{"t":"{text}"}}}}}}"#)
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    error: Option<ReplyError>,
    #[serde(default)]
    push: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ReplyError {
    code: u32,
}

/// One line of a frame: a reply, a push without a stamp, or a ping.
pub fn control(line: &str) -> Control {
    let line = line.trim();
    if line == "{}" {
        return Control::Ping;
    }
    let Ok(reply) = serde_json::from_str::<Reply>(line) else {
        return Control::Other;
    };
    match (reply.id, reply.error, reply.push) {
        (_, _, Some(_)) => Control::Other,
        (id, Some(error), None) => Control::Error(id, error.code.to_string()),
        (Some(id), None, None) => Control::Ack(id),
        (None, None, None) => Control::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_pings_and_errors() {
        assert_eq!(control("{}"), Control::Ping);
        assert_eq!(control(r#"{"id":101,"publish":{}}"#), Control::Ack(101));
        assert_eq!(control(r#"{"id":102,"error":{"code":103,"message":"permission denied"}}"#), {
            Control::Error(Some(102), "103".into())
        });
        assert_eq!(control(r#"{"push":{"channel":"u.a","join":{}}}"#), Control::Other);
        let publish = publish_frame("g.x", 5, "kcb1|0|0|0|0|");
        let value: serde_json::Value = serde_json::from_str(&publish).expect("valid JSON");
        assert_eq!(value["publish"]["data"]["t"], "kcb1|0|0|0|0|");
        assert_eq!(channel(&Target::User("bob".into())), "u.bob");
    }
}
