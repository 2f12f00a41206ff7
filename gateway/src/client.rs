//! A minimal line-based client, enough to chat between two terminals
//! against the standalone gateway (`kubechat-gateway chat --user alice`).

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const HELP: &str = "\
  @bob hello there       send to a user
  #g:123 hi all          send to a group
  /group team bob carol  create a group with members
  /add g:123 dave        add a member
  /channels              list your channels
  /history dm:alice:bob  the newest messages of a channel
  /sync                  everything since this session started
  /who bob carol         who is online (people you share a channel with)
  /quit";

fn describe(frame: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match frame["type"].as_str().unwrap_or_default() {
        "message" => {
            let m = &frame["message"];
            format!("[{}] {}: {}", text(&m["channel"]), text(&m["from"]), text(&m["text"]))
        }
        "ack" => format!("  ✓ stored as {} in {}", text(&frame["id"]), text(&frame["channel"])),
        "error" => format!("  ✗ {}: {}", text(&frame["code"]), text(&frame["message"])),
        "hello" => format!("connected as {} ({})\n{HELP}", text(&frame["user"]), text(&frame["device"])),
        "presence_changed" => {
            format!("  · {} is {}", text(&frame["user"]), if frame["online"] == true { "online" } else { "offline" })
        }
        "presence" => frame["users"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| format!("  · {} is {}", text(&u["user"]), if u["online"] == true { "online" } else { "offline" }))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => frame.to_string(),
    }
}

/// Turns one typed line into a frame (`None`: nothing to send).
pub fn line_to_frame(line: &str, counter: u64) -> Option<Value> {
    let key = format!("cli-{}-{counter}", crate::ids::now_ms());
    let line = line.trim();
    if let Some(rest) = line.strip_prefix('@') {
        let (to, text) = rest.split_once(' ')?;
        return Some(json!({"type": "send", "req": counter.to_string(), "to": {"user": to}, "text": text, "key": key}));
    }
    if let Some(rest) = line.strip_prefix('#') {
        let (to, text) = rest.split_once(' ')?;
        return Some(
            json!({"type": "send", "req": counter.to_string(), "to": {"group": to}, "text": text, "key": key}),
        );
    }
    let mut words = line.split_whitespace();
    match words.next()? {
        "/group" => {
            let name = words.next()?;
            Some(json!({"type": "create_group", "name": name, "members": words.collect::<Vec<_>>()}))
        }
        "/add" => Some(json!({"type": "add_member", "group": words.next()?, "user": words.next()?})),
        "/channels" => Some(json!({"type": "list_channels"})),
        "/history" => Some(json!({"type": "history", "channel": words.next()?})),
        "/sync" => Some(json!({"type": "sync", "after": "0"})),
        "/who" => Some(json!({"type": "presence", "users": words.collect::<Vec<_>>()})),
        _ => None,
    }
}

pub async fn interactive(url: &str, token: &str) -> anyhow::Result<()> {
    let separator = if url.contains('?') { '&' } else { '?' };
    let (socket, _) = tokio_tungstenite::connect_async(format!("{url}{separator}token={token}"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e} (is the gateway running?)"))?;
    let (mut sink, mut stream) = socket.split();
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Text(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(frame) => println!("{}", describe(&frame)),
                    Err(_) => println!("{text}"),
                },
                Message::Close(frame) => {
                    println!("closed by the server: {frame:?}");
                    break;
                }
                _ => {}
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut counter = 0;
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if line.trim() == "/quit" {
                    break;
                }
                counter += 1;
                match line_to_frame(&line, counter) {
                    Some(frame) => sink.send(Message::Text(frame.to_string().into())).await?,
                    None if !line.trim().is_empty() => println!("{HELP}"),
                    None => {}
                }
            }
            _ = heartbeat.tick() => sink.send(Message::Text(json!({"type": "heartbeat"}).to_string().into())).await?,
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    reader.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_frames() {
        let dm = line_to_frame("@bob hello there", 1).expect("frame");
        assert_eq!((dm["to"]["user"].as_str(), dm["text"].as_str()), (Some("bob"), Some("hello there")));
        let group = line_to_frame("/group team bob carol", 2).expect("frame");
        assert_eq!(group["members"], json!(["bob", "carol"]));
        assert!(line_to_frame("hello", 3).is_none());
        assert!(line_to_frame("@bob", 4).is_none());
        assert_eq!(line_to_frame("/who bob carol", 5).expect("frame")["users"], json!(["bob", "carol"]));
    }

    #[test]
    fn presence_reads_as_a_sentence() {
        let changed = json!({"type": "presence_changed", "user": "bob", "online": false, "last_active_ms": 1});
        assert_eq!(describe(&changed), "  · bob is offline");
        let asked = json!({"type": "presence", "req": "1", "users": [{"user": "bob", "online": true}]});
        assert_eq!(describe(&asked), "  · bob is online");
    }
}
