//! Chat over real WebSockets against an in-process gateway, run twice:
//! with the embedded store and with Cassandra (+ Redis for push jobs), and
//! push jobs, which only a cluster queues, with Cassandra.

#[macro_use]
mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::{Backend, Client, token};
use serde_json::{Value, json};

for_both_stores!(
    one_to_one_round_trip,
    group_of_100_gets_every_message_once,
    groups_refuse_the_101st_member_and_outsiders,
    an_owner_who_leaves_hands_the_group_on,
    a_retried_send_is_stored_once,
    history_pages_in_order,
    an_offline_device_syncs_exactly_what_it_missed,
    sends_during_a_sync_are_never_missed,
    the_stored_cursor_never_passes_recent_entries,
    history_survives_a_restart,
    bad_frames_get_errors_and_the_connection_stays,
);

/// Push jobs are queued where push workers consume them (a cluster's Redis
/// stream); a standalone gateway has none and keeps none (`standalone_wal.rs`).
mod cassandra_only {
    #[tokio::test]
    async fn offline_recipients_get_one_push_job() {
        super::offline_recipients_get_one_push_job(super::Backend::cassandra()).await
    }
}

fn id(frame: &Value) -> String {
    frame["id"].as_str().unwrap_or_else(|| panic!("no id in {frame}")).to_string()
}

async fn one_to_one_round_trip(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut alice_laptop = Client::connect(&gateway, "alice", "laptop").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;

    let ack = alice.send_to_user("bob", "hello bob", "k1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["channel"], "dm:alice:bob");
    assert_eq!(ack["duplicate"], false);

    let received = bob.expect_message().await;
    assert_eq!(received["message"]["text"], "hello bob");
    assert_eq!(received["message"]["id"], ack["id"]);
    assert_eq!(received["message"]["from"], "alice");
    // The sender's other device sees it too; the sending connection only gets the ack.
    assert_eq!(alice_laptop.expect_message().await["message"]["id"], ack["id"]);
    alice.expect_no_message(Duration::from_millis(200)).await;

    let reply = bob.send_to_user("alice", "hi alice", "k1").await;
    assert_eq!(reply["type"], "ack");
    assert_eq!(alice.expect_message().await["message"]["text"], "hi alice");

    let history = bob.request(json!({"type": "history", "channel": "dm:alice:bob"})).await;
    let texts: Vec<&str> =
        history["messages"].as_array().expect("messages").iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, vec!["hi alice", "hello bob"], "newest first");
    let channels = alice.request(json!({"type": "list_channels"})).await;
    assert_eq!(channels["channels"], json!(["dm:alice:bob"]));
    gateway.stop(Duration::from_secs(5)).await;
}

async fn group_of_100_gets_every_message_once(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let members: Vec<String> = (1..100).map(|i| format!("member{i:03}")).collect();
    let mut owner = Client::connect(&gateway, "owner", "phone").await;
    let mut owner_tablet = Client::connect(&gateway, "owner", "tablet").await;
    let created = owner.request(json!({"type": "create_group", "name": "big", "members": members})).await;
    assert_eq!(created["type"], "group", "{created}");
    let group = created["group"]["id"].as_str().expect("group id").to_string();
    assert_eq!(created["group"]["members"].as_array().map(Vec::len), Some(100));

    let mut clients = Vec::new();
    for member in &members {
        clients.push(Client::connect(&gateway, member, "phone").await);
    }
    let mut acked = Vec::new();
    for n in 0..3 {
        let ack = owner.send_to_group(&group, &format!("announcement {n}"), &format!("a{n}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(id(&ack));
    }
    for client in clients.iter_mut().chain(std::iter::once(&mut owner_tablet)) {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(client.expect_message().await["message"]["id"].as_str().expect("id").to_string());
        }
        assert_eq!(got, acked, "{} got messages out of order or twice", client.user);
        client.expect_no_message(Duration::from_millis(20)).await;
    }
    gateway.stop(Duration::from_secs(5)).await;
}

async fn groups_refuse_the_101st_member_and_outsiders(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut owner = Client::connect(&gateway, "owner", "phone").await;
    let members: Vec<String> = (1..100).map(|i| format!("m{i}")).collect();
    let created = owner.request(json!({"type": "create_group", "name": "full", "members": members})).await;
    let group = created["group"]["id"].as_str().expect("group id").to_string();

    let refused = owner.request(json!({"type": "add_member", "group": group, "user": "one-too-many"})).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("group_full")), "{refused}");
    let too_big: Vec<String> = (0..100).map(|i| format!("x{i}")).collect();
    let refused = owner.request(json!({"type": "create_group", "name": "huge", "members": too_big})).await;
    assert_eq!(refused["code"], "group_full");

    let mut outsider = Client::connect(&gateway, "outsider", "phone").await;
    let denied = outsider.send_to_group(&group, "let me in", "k").await;
    assert_eq!(denied["code"], "not_member", "{denied}");
    let denied = outsider.request(json!({"type": "history", "channel": group})).await;
    assert_eq!(denied["code"], "not_member");
    let denied = outsider.request(json!({"type": "history", "channel": "dm:m1:m2"})).await;
    assert_eq!(denied["code"], "not_member");
    let missing = outsider.send_to_group("g:12345", "anyone?", "k2").await;
    assert_eq!(missing["code"], "no_such_group");

    // Members leave, and only the owner removes others.
    let mut m1 = Client::connect(&gateway, "m1", "phone").await;
    let forbidden = m1.request(json!({"type": "remove_member", "group": group, "user": "m2"})).await;
    assert_eq!(forbidden["code"], "forbidden");
    let left = m1.request(json!({"type": "remove_member", "group": group, "user": "m1"})).await;
    assert_eq!(left["group"]["members"].as_array().map(Vec::len), Some(99));
    let added = owner.request(json!({"type": "add_member", "group": group, "user": "newcomer"})).await;
    assert_eq!(added["group"]["members"].as_array().map(Vec::len), Some(100));
    gateway.stop(Duration::from_secs(5)).await;
}

/// The owner leaves: the remaining member whose id sorts first owns the
/// group and may remove others; the one who left may not.
async fn an_owner_who_leaves_hands_the_group_on(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut owner = Client::connect(&gateway, "zoe", "phone").await;
    let created =
        owner.request(json!({"type": "create_group", "name": "club", "members": ["carl", "bea", "dan"]})).await;
    let group = created["group"]["id"].as_str().expect("group id").to_string();
    assert_eq!(created["group"]["owner"], "zoe");
    let left = owner.request(json!({"type": "remove_member", "group": group, "user": "zoe"})).await;
    assert_eq!(left["group"]["owner"], "bea", "the first remaining member by id: {left}");

    let mut bea = Client::connect(&gateway, "bea", "phone").await;
    let listed = bea.request(json!({"type": "list_members", "group": group})).await;
    assert_eq!(listed["group"]["owner"], "bea", "stored, not only answered: {listed}");
    let removed = bea.request(json!({"type": "remove_member", "group": group, "user": "dan"})).await;
    assert_eq!(removed["group"]["members"], json!(["bea", "carl"]), "{removed}");
    let mut carl = Client::connect(&gateway, "carl", "phone").await;
    let forbidden = carl.request(json!({"type": "remove_member", "group": group, "user": "bea"})).await;
    assert_eq!(forbidden["code"], "forbidden");
    gateway.stop(Duration::from_secs(5)).await;
}

async fn a_retried_send_is_stored_once(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    let first = alice.send_to_user("bob", "only once", "same-key").await;
    let retry = alice.send_to_user("bob", "only once", "same-key").await;
    assert_eq!(id(&first), id(&retry));
    assert_eq!(retry["duplicate"], true);
    assert_eq!(bob.expect_message().await["message"]["id"], first["id"]);
    bob.expect_no_message(Duration::from_millis(300)).await;
    let history = bob.request(json!({"type": "history", "channel": "dm:alice:bob"})).await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "{history}");
    let (entries, _) = bob.sync_all("0").await;
    assert_eq!(entries.len(), 1);
    gateway.stop(Duration::from_secs(5)).await;
}

async fn history_pages_in_order(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut ids = Vec::new();
    for n in 0..120 {
        ids.push(id(&alice.send_to_user("bob", &format!("message {n}"), &format!("k{n}")).await));
    }
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut frame = json!({"type": "history", "channel": "dm:alice:bob", "limit": 50});
        if let Some(before) = &before {
            frame["before"] = json!(before);
        }
        let page = alice.request(frame).await;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        seen.extend(messages.iter().map(id));
        before = messages.last().map(id);
        if page["has_more"] != json!(true) {
            break;
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let after = alice.request(json!({"type": "history", "channel": "dm:alice:bob", "after": ids[9], "limit": 5})).await;
    let forward: Vec<String> = after["messages"].as_array().expect("messages").iter().map(id).collect();
    assert_eq!(forward, ids[10..15].to_vec(), "after pages go oldest first");
    gateway.stop(Duration::from_secs(5)).await;
}

async fn an_offline_device_syncs_exactly_what_it_missed(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut phone = Client::connect(&gateway, "alice", "phone").await;
    let mut laptop = Client::connect(&gateway, "alice", "laptop").await;
    let mut tablet = Client::connect(&gateway, "alice", "tablet").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    bob.send_to_user("alice", "before", "k-before").await;
    for device in [&mut phone, &mut laptop, &mut tablet] {
        device.expect_message().await;
    }
    // The tablet stores its cursor and goes offline; the cursor may lag
    // ("before" may come again), so the client de-duplicates by id.
    let (seen_before, cursor) = tablet.sync_all("0").await;
    let known: HashSet<String> = seen_before.iter().map(|e| id(&e["message"])).collect();
    tablet.close().await;

    let mut sent = Vec::new();
    for n in 0..50 {
        sent.push(id(&bob.send_to_user("alice", &format!("while away {n}"), &format!("k{n}")).await));
    }
    for _ in 0..50 {
        phone.expect_message().await;
        laptop.expect_message().await;
    }

    let mut tablet = Client::connect(&gateway, "alice", "tablet").await;
    let (entries, _) = tablet.sync_all(&cursor).await;
    let missed: Vec<String> = entries.iter().map(|e| id(&e["message"])).filter(|i| !known.contains(i)).collect();
    assert_eq!(missed, sent, "the tablet must get exactly the 50 messages, in order");
    gateway.stop(Duration::from_secs(5)).await;
}

async fn sends_during_a_sync_are_never_missed(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    for n in 0..150 {
        bob.send_to_user("alice", &format!("early {n}"), &format!("early{n}")).await;
    }
    // Bob keeps sending while alice's new device connects and syncs.
    let url = gateway.ws_url();
    let sender = tokio::spawn(async move {
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("{url}?token={}", token("bob", "laptop"))).await.expect("connect");
        use futures::{SinkExt, StreamExt};
        let mut acked = Vec::new();
        for n in 0..200 {
            let frame = json!({"type": "send", "to": {"user": "alice"}, "text": format!("late {n}"), "key": format!("late{n}")});
            socket.send(tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into())).await.expect("send");
            loop {
                let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = socket.next().await else {
                    panic!("sender connection ended");
                };
                let reply: Value = serde_json::from_str(&text).expect("JSON");
                if reply["type"] == "ack" {
                    acked.push(reply["id"].as_str().expect("id").to_string());
                    break;
                }
            }
        }
        acked
    });
    let mut alice = Client::connect(&gateway, "alice", "new-phone").await;
    let (entries, _) = alice.sync_all("0").await;
    let late_acked = sender.await.expect("sender task");
    // Whatever the sync did not return must have arrived live.
    let mut received: BTreeSet<String> = entries.iter().map(|e| id(&e["message"])).collect();
    let history = bob.request(json!({"type": "history", "channel": "dm:alice:bob", "limit": 1})).await;
    let newest = id(&history["messages"][0]);
    while !received.contains(&newest) {
        received.insert(id(&alice.expect_message().await["message"]));
    }
    received.extend(alice.take_backlog_messages().iter().map(|m| id(&m["message"])));
    let missing: Vec<&String> = late_acked.iter().filter(|i| !received.contains(*i)).collect();
    assert!(missing.is_empty(), "acknowledged but never seen by alice: {missing:?}");
    assert_eq!(received.len(), 350, "after de-duplication by id, alice has every message exactly once");
    gateway.stop(Duration::from_secs(5)).await;
}

/// Paging through recent entries must not move the stored cursor past
/// "now − sync horizon": a write still in flight may land below the last
/// entry seen. (A cursor raised to the page's `after` lost acked messages
/// in the Redis-restart cluster test.)
async fn the_stored_cursor_never_passes_recent_entries(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    for n in 0..150 {
        bob.send_to_user("alice", &format!("m{n}"), &format!("k{n}")).await;
    }
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let first_page = alice.request(json!({"type": "sync", "after": "0", "limit": 100})).await;
    assert_eq!(first_page["has_more"], true, "{first_page}");
    let (entries, cursor) = alice.sync_all(first_page["next"].as_str().expect("next")).await;
    assert_eq!(entries.len(), 50);
    let oldest: u64 = first_page["entries"][0]["position"].as_str().and_then(|p| p.parse().ok()).expect("position");
    let cursor: u64 = cursor.parse().expect("cursor");
    assert!(cursor < oldest, "cursor {cursor} passed entries written seconds ago (oldest {oldest})");
    // Syncing from the stored cursor returns them again (the client drops repeats by id).
    let (again, _) = alice.sync_all(&cursor.to_string()).await;
    assert_eq!(again.len(), 150);
    gateway.stop(Duration::from_secs(5)).await;
}

async fn history_survives_a_restart(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut acked = Vec::new();
    for n in 0..20 {
        acked.push(id(&alice.send_to_user("bob", &format!("durable {n}"), &format!("d{n}")).await));
    }
    alice.close().await;
    gateway.stop(Duration::from_secs(5)).await;

    let (gateway, _) = backend.start().await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    let history = bob.request(json!({"type": "history", "channel": "dm:alice:bob", "limit": 100})).await;
    let mut stored: Vec<String> = history["messages"].as_array().expect("messages").iter().map(id).collect();
    stored.reverse();
    assert_eq!(stored, acked, "every acknowledged message survives the restart");
    // New ids keep increasing after the restart.
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let after = id(&alice.send_to_user("bob", "after restart", "after").await);
    assert!(after.parse::<u64>().expect("id") > acked[19].parse::<u64>().expect("id"));
    gateway.stop(Duration::from_secs(5)).await;
}

async fn bad_frames_get_errors_and_the_connection_stays(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let cases = [
        (json!({"type": "teleport"}), "unknown_type"),
        (json!({"type": "send", "to": {"user": "bob"}, "key": "k"}), "missing_field"),
        (json!({"type": "send", "to": {"user": "bob"}, "text": "x".repeat(100_001), "key": "k"}), "message_too_long"),
        (json!({"type": "send", "to": {"user": "bob"}, "text": "  ", "key": "k"}), "empty_message"),
        (json!({"type": "send", "to": {"user": "alice"}, "text": "me", "key": "k"}), "invalid_argument"),
    ];
    for (frame, code) in cases {
        let reply = alice.request(frame).await;
        assert_eq!(reply["code"], code, "{reply}");
    }
    alice.send_raw("this is not json").await;
    // Still connected and working.
    let ok = alice.send_to_user("bob", &"é".repeat(100_000), "max-length").await;
    assert_eq!(ok["type"], "ack", "exactly the limit is accepted");
    gateway.stop(Duration::from_secs(5)).await;
}

async fn offline_recipients_get_one_push_job(backend: Backend) {
    let (gateway, push) = backend.start().await;
    // Names unique to this run: the Redis push stream outlives test runs.
    let offline = format!("offline-{}-{}", std::process::id(), kubechat_gateway::ids::now_ms());
    let online = format!("online-{}-{}", std::process::id(), kubechat_gateway::ids::now_ms());
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let _online = Client::connect(&gateway, &online, "phone").await;
    let ack = alice.send_to_user(&offline, "are you there?", "p1").await;
    alice.send_to_user(&offline, "are you there?", "p1").await;
    alice.send_to_user(&online, "hi", "p2").await;
    let jobs = push.jobs_for(&offline).await;
    assert_eq!(jobs.len(), 1, "one job per message, none for the retry: {jobs:?}");
    assert_eq!(jobs[0]["message_id"], ack["id"]);
    assert_eq!(jobs[0]["summary"], "are you there?");
    assert!(push.jobs_for(&online).await.is_empty(), "no push for a user online here");
    gateway.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn connecting_without_a_valid_token_is_refused_with_401() {
    let backend = Backend::embedded();
    let (gateway, _) = backend.start().await;
    let status_of = |url: String| async move {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().to_string();
                (response.status().as_u16(), body)
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connected without a valid token"),
        }
    };
    let (status, body) = status_of(gateway.ws_url()).await;
    assert_eq!(status, 401);
    assert!(body.contains("no token"), "{body}");
    let forged = kubechat_gateway::transport::auth::Authenticator::new(b"some-other-key-0123456789")
        .expect("key")
        .mint("alice", "phone", 60)
        .expect("mint");
    assert_eq!(status_of(format!("{}?token={forged}", gateway.ws_url())).await.0, 401);
    assert_eq!(status_of(format!("{}?token=not.a.jwt", gateway.ws_url())).await.0, 401);
    gateway.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_expiring_token_ends_the_session_with_4003() {
    use futures::StreamExt;
    let backend = Backend::embedded();
    let (gateway, _) = backend.start().await;
    let short = kubechat_gateway::transport::auth::Authenticator::new(common::KEY)
        .expect("key")
        .mint("alice", "phone", 1)
        .expect("mint");
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{}?token={short}", gateway.ws_url())).await.expect("connect");
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = socket.next().await {
            if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
                return frame;
            }
        }
        None
    })
    .await
    .expect("the session should end when the token expires");
    let frame = close.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4003, "{frame:?}");
    gateway.stop(Duration::from_secs(5)).await;
}
