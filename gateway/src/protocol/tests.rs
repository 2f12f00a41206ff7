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
    // serde would take a tagged enum from an array: a frame is an object.
    assert_eq!(code_of(r#"["list_channels",""]"#), ErrorCode::BadFrame);
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

/// Properties of the decoder over generated input. A failure shrinks to a
/// small input and is saved under `gateway/proptest-regressions/` (replayed
/// first on every later run); `PROPTEST_RNG_SEED=<n>` replays a whole run,
/// `PROPTEST_CASES=<n>` runs more cases than the default below.
mod properties {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::{Index, select};
    use serde_json::Value;

    /// Enough cases to be worth running on every `cargo test`, few enough to
    /// take seconds in a debug build.
    fn config() -> ProptestConfig {
        let default = ProptestConfig::default();
        if std::env::var_os("PROPTEST_CASES").is_some() { default } else { ProptestConfig { cases: 384, ..default } }
    }

    /// Every field some client frame has.
    const FIELDS: [&str; 16] = [
        "type", "req", "to", "text", "key", "after", "before", "limit", "channel", "name", "members", "group", "user",
        "users", "platform", "token",
    ];

    /// Characters JSON is made of, plus a few that are not ASCII.
    const JSONISH: &str = "{}[]\":,\\ 0123456789-+eE.tfnulrsaybpgxu\n\té😀\u{0}\u{ffff}";

    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![4 => select(&FIELDS[..]).prop_map(String::from), 1 => "[a-z_]{0,6}"]
    }

    /// Strings near what the validators look at: names, group and direct
    /// channel ids, ids, blank text, long text, request ids around the limit.
    fn plausible_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_.@-]{1,8}",
            "[A-Za-z0-9_.@:-]{60,70}",
            "g:[0-9]{0,20}",
            "dm:[a-z]{1,3}:[a-z]{1,3}",
            "[0-9]{1,21}",
            "-?[0-9]{1,3}(\\.[0-9])?",
            " {0,3}",
            "[a-z😀é]{0,14}",
            "x{60,70}",
            select(&["webhook", "fcm", "apns", "carrier-pigeon"][..]).prop_map(String::from),
            select(&frames::CLIENT_TYPES[..]).prop_map(String::from),
        ]
    }

    /// Any JSON value, nested a few levels, with plausible strings and field names.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // Not finite becomes null.
            any::<f64>().prop_map(Value::from),
            (0u64..300).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            plausible_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(field_name(), inner, 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    /// A value for a frame's field: of the right shape for some field, or anything.
    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            2 => plausible_string().prop_map(Value::String),
            1 => (select(&["user", "group"][..]), plausible_string()).prop_map(|(k, v)| serde_json::json!({k: v})),
            1 => prop::collection::vec(plausible_string(), 0..6).prop_map(|v| serde_json::json!(v)),
            1 => prop::collection::vec("[a-z]{1,8}", 0..9).prop_map(|v| serde_json::json!(v)),
            2 => "[ \t\n]{0,3}".prop_map(Value::String),
            1 => prop_oneof![(0u64..300).prop_map(Value::from), any::<u64>().prop_map(Value::from)],
            2 => any_json(),
        ]
    }

    /// An object shaped like a frame: a well-formed frame with one field
    /// set to something else or removed, or a `type` (usually a real one)
    /// with random fields of random types.
    fn frame_shaped() -> impl Strategy<Value = Value> {
        // The field changed: usually one the frame has, sometimes any.
        let field = prop_oneof![3 => any::<Index>().prop_map(Ok), 1 => field_name().prop_map(Err)];
        // Request ids around the longest allowed (64 characters) or not strings.
        let req = prop_oneof!["\\PC{0,8}".prop_map(Value::String), "\\PC{62,67}".prop_map(Value::String), any_json()];
        let near_miss =
            (well_formed(), field, prop::option::weighted(0.8, field_value()), prop::option::weighted(0.3, req))
                .prop_map(|((mut value, _), field, replacement, req)| {
                    if let Value::Object(object) = &mut value {
                        if let Some(req) = req {
                            object.insert("req".into(), req);
                        }
                        let field = match field {
                            Ok(own) => object.keys().nth(own.index(object.len())).cloned().unwrap_or_default(),
                            Err(any) => any,
                        };
                        match replacement {
                            Some(replacement) => object.insert(field, replacement),
                            None => object.remove(&field),
                        };
                    }
                    value
                });
        prop_oneof![2 => near_miss, 1 => random_fields()]
    }

    fn random_fields() -> impl Strategy<Value = Value> {
        let kind = prop_oneof![
            8 => select(&frames::CLIENT_TYPES[..]).prop_map(Value::from),
            1 => plausible_string().prop_map(Value::String),
            1 => any_json(),
        ];
        (prop::option::weighted(0.95, kind), prop::collection::btree_map(field_name(), field_value(), 0..7)).prop_map(
            |(kind, fields)| {
                let mut object: serde_json::Map<String, Value> = fields.into_iter().collect();
                if let Some(kind) = kind {
                    object.insert("type".into(), kind);
                }
                Value::Object(object)
            },
        )
    }

    /// A frame the protocol allows, as JSON, with the frame it must decode to.
    fn well_formed() -> impl Strategy<Value = (Value, ClientFrame)> {
        let name = "[A-Za-z0-9_.@-]{1,64}";
        let group = "g:[0-9a-z]{1,20}";
        let req = prop::option::of("\\PC{0,64}");
        let limit = prop::option::of(1usize..=50);
        // Up to `limits().max_message_chars` (10) characters, one of them not blank.
        let text = "\\PC{0,4}[a-z😀é]\\PC{0,4}";
        let id = (any::<u64>(), any::<bool>())
            .prop_map(|(id, quoted)| (id, if quoted { Value::from(id.to_string()) } else { Value::from(id) }));
        prop_oneof![
            (
                req.clone(),
                prop_oneof![name.prop_map(Recipient::User), group.prop_map(Recipient::Group)],
                text,
                "[ -~]{1,128}"
            )
                .prop_map(|(req, to, text, key)| {
                    let to_json = match &to {
                        Recipient::User(u) => serde_json::json!({"user": u}),
                        Recipient::Group(g) => serde_json::json!({"group": g}),
                    };
                    let value =
                        serde_json::json!({"type": "send", "req": req, "to": to_json, "text": text, "key": key});
                    (value, ClientFrame::Send { req, to, text, key })
                }),
            (req.clone(), id.clone(), limit.clone()).prop_map(|(req, (after, after_json), limit)| {
                let value = serde_json::json!({"type": "sync", "req": req, "after": after_json, "limit": limit});
                (value, ClientFrame::Sync { req, after, limit })
            }),
            (req.clone(), "[a-z0-9:]{1,40}", prop::option::of(id), any::<bool>(), limit).prop_map(
                |(req, channel, id, backwards, limit)| {
                    let (before, after) = match (&id, backwards) {
                        (Some((id, _)), true) => (Some(*id), None),
                        (Some((id, _)), false) => (None, Some(*id)),
                        (None, _) => (None, None),
                    };
                    let mut value =
                        serde_json::json!({"type": "history", "req": req, "channel": channel, "limit": limit});
                    if let Some((_, json)) = id {
                        value[if backwards { "before" } else { "after" }] = json;
                    }
                    (value, ClientFrame::History { req, channel, before, after, limit })
                }
            ),
            (req.clone(), "[a-zA-Z é😀]{1,100}", prop::collection::vec(name, 0..=3)).prop_map(
                |(req, group_name, members)| {
                    let value =
                        serde_json::json!({"type": "create_group", "req": req, "name": group_name, "members": members});
                    (value, ClientFrame::CreateGroup { req, name: group_name, members })
                }
            ),
            (req.clone(), group, name, any::<bool>()).prop_map(|(req, group, user, add)| {
                let kind = if add { "add_member" } else { "remove_member" };
                let value = serde_json::json!({"type": kind, "req": req, "group": group, "user": user});
                let frame = if add {
                    ClientFrame::AddMember { req, group, user }
                } else {
                    ClientFrame::RemoveMember { req, group, user }
                };
                (value, frame)
            }),
            (req.clone(), prop::collection::vec(name, 0..5), prop::option::of(group)).prop_map(
                |(req, users, group)| {
                    let value = serde_json::json!({"type": "presence", "req": req, "users": users, "group": group});
                    (value, ClientFrame::Presence { req, users, group })
                }
            ),
            (req, 0..4usize).prop_map(|(req, which)| {
                let (kind, frame) = match which {
                    0 => ("heartbeat", ClientFrame::Heartbeat { req: req.clone() }),
                    1 => ("logout", ClientFrame::Logout { req: req.clone() }),
                    2 => ("list_channels", ClientFrame::ListChannels { req: req.clone() }),
                    _ => ("list_members", ClientFrame::ListMembers { req: req.clone(), group: "g:1".into() }),
                };
                let mut value = serde_json::json!({"type": kind, "req": req});
                if which == 3 {
                    value["group"] = "g:1".into();
                }
                (value, frame)
            }),
        ]
    }

    /// Text: anything, JSON-like noise, or JSON a client might send.
    fn any_text() -> impl Strategy<Value = String> {
        let jsonish: Vec<char> = JSONISH.chars().collect();
        prop_oneof![
            any::<String>(),
            prop::collection::vec(select(jsonish), 0..120).prop_map(|chars| chars.into_iter().collect()),
            any_json().prop_map(|v| v.to_string()),
        ]
    }

    /// One edit of a text: delete, insert, replace a character, or cut it short.
    fn edits() -> impl Strategy<Value = Vec<(u8, Index, char)>> {
        let jsonish: Vec<char> = JSONISH.chars().collect();
        prop::collection::vec((0u8..4, any::<Index>(), select(jsonish)), 1..6)
    }

    fn apply(text: &str, edits: &[(u8, Index, char)]) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        for (op, at, c) in edits {
            let at = at.index(chars.len() + 1);
            match op {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 => chars.insert(at, *c),
                2 if at < chars.len() => chars[at] = *c,
                _ => chars.truncate(at),
            }
        }
        chars.into_iter().collect()
    }

    /// What holds for every input: no panic (proptest fails on one), the
    /// fast path and the explaining path give the same answer, a frame is a
    /// valid one, and an error is typed and echoes the request id the input named.
    fn decodes_to_a_frame_or_a_typed_error(text: &str) -> Result<(), TestCaseError> {
        let limits = limits();
        let decoded = decode(text, &limits);
        prop_assert_eq!(&decoded, &explain(text, &limits), "the two paths disagree on {:?}", text);
        match &decoded {
            Ok(frame) => {
                prop_assert!(frame.validate(&limits).is_ok());
                prop_assert!(frame.req().is_none_or(|r| r.chars().count() <= MAX_REQUEST_ID_LEN));
            }
            Err(error) => {
                prop_assert!(!error.message.is_empty());
                let named = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v.get("req")?.as_str().map(|r| r.chars().take(MAX_REQUEST_ID_LEN).collect()));
                prop_assert_eq!(&error.req, &named, "the error's req, for {:?}", text);
            }
        }
        Ok(())
    }

    /// The generators are worth running: frame-shaped input, sometimes
    /// mutated, reaches every outcome of the decoder, not only `bad_frame`.
    #[test]
    fn generated_frames_reach_every_kind_of_outcome() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let mut runner = TestRunner::deterministic();
        let strategy = (frame_shaped(), prop::option::weighted(0.3, edits()));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let (value, edits) = strategy.new_tree(&mut runner).expect("a value").current();
            let text = apply(&value.to_string(), edits.as_deref().unwrap_or_default());
            seen.insert(match decode(&text, &limits()) {
                Ok(_) => "ok",
                Err(e) => e.code.as_str(),
            });
        }
        let decoder_codes = [
            ErrorCode::BadFrame,
            ErrorCode::UnknownType,
            ErrorCode::MissingField,
            ErrorCode::InvalidArgument,
            ErrorCode::MessageTooLong,
            ErrorCode::EmptyMessage,
            ErrorCode::GroupFull,
        ];
        for outcome in decoder_codes.iter().map(|c| c.as_str()).chain(["ok"]) {
            assert!(seen.contains(outcome), "no generated input led to {outcome}: {seen:?}");
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_text(text in any_text()) {
            decodes_to_a_frame_or_a_typed_error(&text)?;
        }

        #[test]
        fn frame_shaped_json(value in frame_shaped()) {
            decodes_to_a_frame_or_a_typed_error(&value.to_string())?;
        }

        #[test]
        fn mutated_frames(value in prop_oneof![frame_shaped(), well_formed().prop_map(|(v, _)| v)], edits in edits()) {
            decodes_to_a_frame_or_a_typed_error(&apply(&value.to_string(), &edits))?;
        }

        #[test]
        fn well_formed_frames_decode_to_what_they_say((value, expected) in well_formed(), pretty in any::<bool>()) {
            let text = if pretty { serde_json::to_string_pretty(&value)? } else { value.to_string() };
            prop_assert_eq!(decode(&text, &limits()), Ok(expected));
            decodes_to_a_frame_or_a_typed_error(&text)?;
        }
    }
}
