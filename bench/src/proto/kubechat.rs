//! kubechat protocol v1 (docs/protocol.md): token in the query, `hello`
//! first, `send` → `ack`, live `message` frames, `create_group`.

use serde::Deserialize;

use super::{Control, Target, request};
use crate::net::Ws;

pub const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

pub fn url_with_token(base: &str, token: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}token={token}")
}

pub async fn await_hello(ws: &mut Ws) -> anyhow::Result<()> {
    request(ws, None, "waiting for hello", |frame| match frame["type"].as_str() {
        Some("hello") => Some(Ok(())),
        Some("error") => Some(Err(anyhow::anyhow!("refused before hello: {frame}"))),
        _ => None,
    })
    .await
}

/// `key_prefix` makes idempotency keys unique per run and sender.
pub fn send_frame(target: &Target, req: u32, key_prefix: &str, text: &str) -> String {
    let (kind, id) = match target {
        Target::User(user) => ("user", user),
        Target::Group(group) => ("group", group),
    };
    format!(r#"{{"type":"send","req":"{req}","to":{{"{kind}":"{id}"}},"key":"{key_prefix}-{req}","text":"{text}"}}"#)
}

/// Creates a group owned by the connection's user; returns its id.
pub async fn create_group(ws: &mut Ws, name: &str, members: &[String]) -> anyhow::Result<String> {
    let frame = serde_json::json!({"type": "create_group", "req": "setup-group", "name": name, "members": members});
    request(ws, Some(frame.to_string()), "create_group", |reply| {
        if reply["req"] != "setup-group" {
            return None;
        }
        Some(match (reply["type"].as_str(), reply["group"]["id"].as_str()) {
            (Some("group"), Some(id)) => Ok(id.to_string()),
            _ => Err(anyhow::anyhow!("create_group refused: {reply}")),
        })
    })
    .await
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    req: Option<&'a str>,
    #[serde(default, borrow)]
    code: Option<&'a str>,
}

pub fn control(line: &str) -> Control {
    let Ok(frame) = serde_json::from_str::<Frame>(line) else {
        return Control::Other;
    };
    let req = frame.req.and_then(|r| r.parse().ok());
    match (frame.kind, req) {
        ("ack", Some(req)) => Control::Ack(req),
        ("error", req) => Control::Error(req, frame.code.unwrap_or("error").to_string()),
        _ => Control::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn frames_match_the_protocol_doc() {
        let frame = send_frame(&Target::User("bob".into()), 7, "r1-3", "kcb1|0|1|2|3|");
        let value: Value = serde_json::from_str(&frame).expect("valid JSON");
        assert_eq!(value["type"], "send");
        assert_eq!(value["req"], "7");
        assert_eq!(value["to"]["user"], "bob");
        assert_eq!(value["key"], "r1-3-7");
        let ack = r#"{"type":"ack","req":"7","id":"1","channel":"dm:a:b","created_at_ms":1,"duplicate":false}"#;
        assert_eq!(control(ack), Control::Ack(7));
        let error = r#"{"type":"error","req":"8","code":"rate_limited","message":"slow down"}"#;
        assert_eq!(control(error), Control::Error(Some(8), "rate_limited".into()));
        assert_eq!(control(r#"{"type":"presence_changed","user":"x"}"#), Control::Other);
        assert_eq!(control("not json"), Control::Other);
        assert_eq!(url_with_token("ws://127.0.0.1:1/v1/ws", "t"), "ws://127.0.0.1:1/v1/ws?token=t");
    }
}
