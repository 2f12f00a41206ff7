use super::*;
use serde_json::json;

fn limits() -> Limits {
    Limits { max_message_chars: 10, max_group_members: 4, max_page: 50, ..Limits::default() }
}

fn code_of(text: &str) -> ErrorCode {
    decode(text, &limits()).expect_err("should be refused").code
}

#[test]
fn a_send_decodes() {
    let frame = decode(r#"{"type":"send","req":"r1","to":{"user":"bob"},"text":"hi","key":"k1"}"#, &limits());
    assert_eq!(
        frame,
        Ok(ClientFrame::Send {
            req: Some("r1".into()),
            to: Recipient::User("bob".into()),
            text: "hi".into(),
            key: "k1".into()
        })
    );
}

#[test]
fn malformed_frames_get_stable_codes() {
    assert_eq!(code_of("not json"), ErrorCode::BadFrame);
    assert_eq!(code_of("[1,2]"), ErrorCode::BadFrame);
    assert_eq!(code_of(r#"{"no":"type"}"#), ErrorCode::BadFrame);
    assert_eq!(code_of(r#"{"type":"teleport"}"#), ErrorCode::UnknownType);
    assert_eq!(code_of(r#"{"type":"send","to":{"user":"bob"},"key":"k"}"#), ErrorCode::MissingField);
    assert_eq!(code_of(r#"{"type":"send","to":{"user":"bob"},"text":5,"key":"k"}"#), ErrorCode::BadFrame);
    assert_eq!(code_of(r#"{"type":"send","to":{"user":"a:b"},"text":"x","key":"k"}"#), ErrorCode::InvalidArgument);
    assert_eq!(code_of(r#"{"type":"send","to":{"group":"nope"},"text":"x","key":"k"}"#), ErrorCode::InvalidArgument);
    assert_eq!(code_of(r#"{"type":"send","to":{"user":"bob"},"text":"x","key":""}"#), ErrorCode::InvalidArgument);
    assert_eq!(code_of(r#"{"type":"sync","limit":0}"#), ErrorCode::InvalidArgument);
    assert_eq!(code_of(r#"{"type":"sync","limit":51}"#), ErrorCode::InvalidArgument);
    assert_eq!(code_of(r#"{"type":"sync","after":"abc"}"#), ErrorCode::BadFrame);
    assert_eq!(code_of(r#"{"type":"history","channel":"g:1","before":"1","after":"2"}"#), ErrorCode::InvalidArgument);
}

#[test]
fn errors_carry_the_request_id() {
    let error = decode(r#"{"type":"send","req":"r9","to":{"user":"bob"},"text":"   ","key":"k"}"#, &limits())
        .expect_err("empty text");
    assert_eq!(error.code, ErrorCode::EmptyMessage);
    assert_eq!(error.req.as_deref(), Some("r9"));
    let unknown = decode(r#"{"type":"x","req":"r10"}"#, &limits()).expect_err("unknown");
    assert_eq!(unknown.req.as_deref(), Some("r10"));
}

#[test]
fn text_length_counts_characters_not_bytes() {
    let send = |text: &str| json!({"type":"send","to":{"user":"bob"},"text":text,"key":"k"}).to_string();
    // 10 four-byte characters fit a 10-character limit; 11 do not.
    assert!(decode(&send(&"😀".repeat(10)), &limits()).is_ok());
    let error = decode(&send(&"😀".repeat(11)), &limits()).expect_err("too long");
    assert_eq!(error.code, ErrorCode::MessageTooLong);
    assert!(error.message.contains("11 characters"), "{}", error.message);
    assert!(decode(&send(&"é".repeat(10)), &limits()).is_ok());
}

#[test]
fn ids_are_accepted_as_strings_or_numbers() {
    let by_string = decode(r#"{"type":"sync","after":"18446744073709551615"}"#, &limits());
    assert_eq!(by_string, Ok(ClientFrame::Sync { req: None, after: u64::MAX, limit: None }));
    let by_number = decode(r#"{"type":"sync","after":42,"limit":5}"#, &limits());
    assert_eq!(by_number, Ok(ClientFrame::Sync { req: None, after: 42, limit: Some(5) }));
    assert_eq!(decode(r#"{"type":"sync"}"#, &limits()), Ok(ClientFrame::Sync { req: None, after: 0, limit: None }));
}

#[test]
fn groups_respect_the_member_limit() {
    let ok = r#"{"type":"create_group","name":"team","members":["a","b","c"]}"#;
    assert!(decode(ok, &limits()).is_ok());
    let full = r#"{"type":"create_group","name":"team","members":["a","b","c","d"]}"#;
    assert_eq!(code_of(full), ErrorCode::GroupFull);
    assert_eq!(code_of(r#"{"type":"create_group","name":""}"#), ErrorCode::InvalidArgument);
}

#[test]
fn server_frames_encode_ids_as_strings() {
    let frame = ServerFrame::Ack {
        req: Some("r1".into()),
        id: u64::MAX,
        channel: "dm:a:b".into(),
        created_at_ms: 5,
        duplicate: false,
    };
    let value: serde_json::Value = serde_json::from_str(&encode(&frame)).expect("JSON");
    assert_eq!(value["type"], "ack");
    assert_eq!(value["id"], "18446744073709551615");
    let error: ServerFrame = ProtocolError::new(ErrorCode::NotMember, "no").with_req(Some("r2".into())).into();
    let value: serde_json::Value = serde_json::from_str(&encode(&error)).expect("JSON");
    assert_eq!((value["code"].as_str(), value["req"].as_str()), (Some("not_member"), Some("r2")));
}

#[test]
fn direct_channels_are_symmetric() {
    assert_eq!(direct_channel("bob", "alice"), "dm:alice:bob");
    assert_eq!(direct_channel("alice", "bob"), "dm:alice:bob");
    assert_eq!(direct_members("dm:alice:bob"), Some(("alice", "bob")));
    assert_eq!(direct_members("g:1"), None);
    assert_eq!(direct_members("dm:alice"), None);
    assert!(valid_name("user.name@example-1_x"));
    assert!(!valid_name(""));
    assert!(!valid_name("a b"));
    assert!(!valid_name(&"x".repeat(65)));
}

/// Property: whatever bytes arrive, decoding returns Ok or a protocol error;
/// it never panics. Inputs are valid frames mutated by a seeded generator
/// (deterministic, so a failure reproduces), plus random ASCII and JSON-ish noise.
#[test]
fn decoding_never_panics_on_mutated_frames() {
    let seeds = [
        r#"{"type":"send","req":"r1","to":{"user":"bob"},"text":"hello","key":"k1"}"#,
        r#"{"type":"send","to":{"group":"g:123"},"text":"hi all","key":"k2"}"#,
        r#"{"type":"sync","after":"123","limit":10}"#,
        r#"{"type":"history","channel":"dm:a:b","before":"99","limit":5}"#,
        r#"{"type":"create_group","name":"team","members":["a","b"]}"#,
        r#"{"type":"add_member","group":"g:1","user":"c"}"#,
        r#"{"type":"presence","users":["a"],"group":"g:1"}"#,
        r#"{"type":"heartbeat"}"#,
    ];
    let alphabet: Vec<char> = "{}[]\":,\\ 0123456789-eE.tfnulrsaybpgxé😀\u{0}\u{ffff}".chars().collect();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for round in 0..20_000 {
        let mut chars: Vec<char> = seeds[round % seeds.len()].chars().collect();
        for _ in 0..(next() % 6 + 1) {
            let at = (next() as usize) % (chars.len() + 1);
            match next() % 4 {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => chars.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                2 if at < chars.len() => chars[at] = alphabet[(next() as usize) % alphabet.len()],
                _ => chars.truncate(at),
            }
        }
        let text: String = chars.into_iter().collect();
        let decoded = decode(&text, &limits());
        // The direct path and the explaining path agree on every input.
        assert_eq!(decoded.is_ok(), explain(&text, &limits()).is_ok(), "{text}");
        if let Ok(frame) = decoded {
            assert_eq!(Ok(frame), explain(&text, &limits()), "{text}");
            accepted += 1;
        }
    }
    // Some mutations keep a frame valid; most do not. Both paths ran.
    assert!(accepted > 0 && accepted < 20_000, "accepted {accepted}");
}

#[test]
fn json_string_lengths_match_what_the_encoder_writes() {
    for text in ["", "hi", "quote \" and \\ back", "tab\tnew\nline\r", "\u{0}\u{1f}\u{7f}", "é😀", "\u{8}\u{c}"] {
        assert_eq!(json_string_len(text), serde_json::to_string(text).expect("json").len(), "{text:?}");
    }
    let message = crate::store::Message {
        id: u64::MAX,
        channel: "dm:a:b".into(),
        sender: "a".into(),
        sender_device: "phone".into(),
        text: "\u{1}x\"".repeat(50),
        created_at_ms: i64::MAX,
    };
    let wire = serde_json::to_string(&WireMessage::from(&message)).expect("json");
    assert!(WireMessage::encoded_len(&message) >= wire.len(), "an upper bound of {wire}");
}

#[test]
fn pages_stop_before_their_byte_budget_but_keep_one_entry() {
    let mut sizes = vec![300, 300, 300];
    assert!(fit_page(&mut sizes, 700, |s| *s), "cut");
    assert_eq!(sizes, vec![300, 300]);
    let mut huge = vec![5000, 1];
    assert!(fit_page(&mut huge, 700, |s| *s));
    assert_eq!(huge, vec![5000], "the first entry always comes");
    let mut small = vec![1, 2, 3];
    assert!(!fit_page(&mut small, 700, |s| *s), "nothing cut");
    assert_eq!(small.len(), 3);
}
