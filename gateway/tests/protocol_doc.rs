//! Keeps docs/protocol.md in step with the code: every client example
//! decodes, every server example is JSON of a known type, and every frame
//! type and error code is documented.

use kubechat_gateway::protocol::frames::CLIENT_TYPES;
use kubechat_gateway::protocol::{ErrorCode, Limits, decode};

const SERVER_TYPES: [&str; 17] = [
    "hello",
    "reconnect",
    "ack",
    "message",
    "synced",
    "history",
    "group",
    "channels",
    "presence",
    "presence_changed",
    "ok",
    "error",
    "resync",
    "receipt",
    "receipts",
    "typing",
    "overview",
];

fn doc() -> String {
    include_str!("../../docs/protocol.md").to_owned()
}

#[test]
fn every_client_example_decodes() {
    let doc = doc();
    let examples: Vec<&str> = doc.lines().filter_map(|l| l.strip_prefix("→ ")).collect();
    assert!(examples.len() >= 15, "only {} client examples", examples.len());
    for example in &examples {
        let value: serde_json::Value = serde_json::from_str(example).unwrap_or_else(|e| panic!("{example}: {e}"));
        let kind = value["type"].as_str().unwrap_or_default();
        let decoded = decode(example, &Limits::default());
        // The error example is meant to be refused, with the code it shows.
        if example.contains(r#""text":"""#) {
            assert_eq!(decoded.expect_err("empty text").code, ErrorCode::EmptyMessage);
        } else {
            decoded.unwrap_or_else(|e| panic!("{kind} example does not decode: {e}\n{example}"));
        }
    }
    for kind in CLIENT_TYPES {
        let quoted = format!(r#""type":"{kind}""#);
        assert!(examples.iter().any(|e| e.contains(&quoted)), "no example of client frame {kind:?}");
    }
}

#[test]
fn every_server_example_is_a_known_frame() {
    let doc = doc();
    let examples: Vec<&str> = doc.lines().filter_map(|l| l.strip_prefix("← ")).collect();
    for example in &examples {
        let value: serde_json::Value = serde_json::from_str(example).unwrap_or_else(|e| panic!("{example}: {e}"));
        let kind = value["type"].as_str().unwrap_or_default();
        assert!(SERVER_TYPES.contains(&kind), "undocumented server type {kind:?}");
    }
    for kind in SERVER_TYPES {
        let quoted = format!(r#""type":"{kind}""#);
        assert!(examples.iter().any(|e| e.contains(&quoted)), "no example of server frame {kind:?}");
    }
}

#[test]
fn every_error_code_is_documented() {
    let doc = doc();
    for code in ErrorCode::ALL {
        assert!(
            doc.contains(&format!("`{}`", code.as_str())),
            "error code {} is not in docs/protocol.md",
            code.as_str()
        );
    }
}
