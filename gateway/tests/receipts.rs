//! Read receipts, unread counts and typing over real WebSockets against an
//! in-process gateway, with the embedded store and with Cassandra: markers
//! only move forward and reach whom they should, bad input gets an error
//! frame and the connection stays, a typing flood is rate limited.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Client};
use serde_json::{Value, json};

for_both_stores!(
    direct_receipts_reach_the_peer_and_the_other_devices,
    group_receipts_reach_the_sender_only,
    bad_markers_get_errors_and_the_connection_stays,
    typing_reaches_the_other_members_and_a_flood_is_limited,
);

/// Nothing comes for `wait` but frames of other types than `kind`.
async fn expect_none(client: &mut Client, kind: &str, wait: Duration) {
    if let Ok(frame) = tokio::time::timeout(wait, client.expect_frame(&[kind])).await {
        panic!("{}: unexpected {frame}", client.user);
    }
}

fn id(ack: &Value) -> String {
    assert_eq!(ack["type"], "ack", "{ack}");
    ack["id"].as_str().expect("id").to_string()
}

fn overview_row(overview: &Value, channel: &str) -> Value {
    assert_eq!(overview["type"], "overview", "{overview}");
    overview["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .find(|row| row["channel"] == channel)
        .cloned()
        .unwrap_or_else(|| panic!("{channel} not in {overview}"))
}

async fn direct_receipts_reach_the_peer_and_the_other_devices(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    let mut bob_laptop = Client::connect(&gateway, "bob", "laptop").await;
    let channel = "dm:alice:bob";
    let first = id(&alice.send_to_user("bob", "one", "k1").await);
    let second = id(&alice.send_to_user("bob", "two", "k2").await);

    // Unread derives from the read marker: two from alice, none of alice's own.
    let row = overview_row(&bob.request(json!({"type": "overview"})).await, channel);
    assert_eq!((row["unread"].clone(), row["read_up_to"].clone()), (json!(2), json!("0")), "{row}");
    assert_eq!(row["last"]["text"], "two");
    assert_eq!(row["name"], Value::Null);
    let row = overview_row(&alice.request(json!({"type": "overview"})).await, channel);
    assert_eq!(row["unread"], 0, "own messages are not unread: {row}");

    // Delivered: bob's reply, then alice and bob's other device hear of it.
    let reply = bob.request(json!({"type": "mark", "channel": channel, "delivered_up_to": second})).await;
    assert_eq!(reply["type"], "receipt", "{reply}");
    assert_eq!((reply["delivered_up_to"].clone(), reply["read_up_to"].clone()), (json!(second), json!("0")));
    for device in [&mut alice, &mut bob_laptop] {
        let receipt = device.expect_frame(&["receipt"]).await;
        assert_eq!(receipt["user"], "bob", "{receipt}");
        assert_eq!(receipt["channel"], channel);
        assert_eq!(receipt["delivered_up_to"], json!(second));
        assert!(receipt.get("req").is_none(), "a live receipt has no req: {receipt}");
    }

    // Read the first: one unread left.
    let reply = bob.request(json!({"type": "mark", "channel": channel, "read_up_to": first})).await;
    assert_eq!((reply["delivered_up_to"].clone(), reply["read_up_to"].clone()), (json!(second), json!(first)));
    assert_eq!(alice.expect_frame(&["receipt"]).await["read_up_to"], json!(first));
    assert_eq!(overview_row(&bob.request(json!({"type": "overview"})).await, channel)["unread"], 1);

    // Backwards: ignored, the reply shows the markers as they stand, nobody is told.
    let reply = bob.request(json!({"type": "mark", "channel": channel, "delivered_up_to": first})).await;
    assert_eq!((reply["delivered_up_to"].clone(), reply["read_up_to"].clone()), (json!(second), json!(first)));
    expect_none(&mut alice, "receipt", Duration::from_millis(300)).await;

    // Both members' state on demand.
    let receipts = alice.request(json!({"type": "receipts", "channel": channel})).await;
    assert_eq!(
        receipts["receipts"],
        json!([
            {"user": "alice", "delivered_up_to": "0", "read_up_to": "0"},
            {"user": "bob", "delivered_up_to": second, "read_up_to": first},
        ]),
        "{receipts}"
    );
    bob.request(json!({"type": "mark", "channel": channel, "read_up_to": second})).await;
    let row = overview_row(&bob.request(json!({"type": "overview"})).await, channel);
    assert_eq!((row["unread"].clone(), row["read_up_to"].clone()), (json!(0), json!(second)), "{row}");
}

async fn group_receipts_reach_the_sender_only(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    let mut carol = Client::connect(&gateway, "carol", "phone").await;
    let group = alice.request(json!({"type": "create_group", "name": "team", "members": ["bob", "carol"]})).await;
    let group = group["group"]["id"].as_str().expect("group id").to_string();
    let from_alice = id(&alice.send_to_group(&group, "from alice", "a1").await);
    let from_carol = id(&carol.send_to_group(&group, "from carol", "c1").await);

    let row = overview_row(&bob.request(json!({"type": "overview"})).await, &group);
    assert_eq!((row["name"].clone(), row["unread"].clone()), (json!("team"), json!(2)), "{row}");

    bob.request(json!({"type": "mark", "channel": group, "read_up_to": from_alice})).await;
    let receipt = alice.expect_frame(&["receipt"]).await;
    assert_eq!((receipt["user"].clone(), receipt["read_up_to"].clone()), (json!("bob"), json!(from_alice)));
    expect_none(&mut carol, "receipt", Duration::from_millis(300)).await;

    bob.request(json!({"type": "mark", "channel": group, "read_up_to": from_carol})).await;
    assert_eq!(carol.expect_frame(&["receipt"]).await["read_up_to"], json!(from_carol));
    let receipts = carol.request(json!({"type": "receipts", "channel": group})).await;
    let users: Vec<&str> =
        receipts["receipts"].as_array().expect("list").iter().filter_map(|r| r["user"].as_str()).collect();
    assert_eq!(users, ["alice", "bob", "carol"], "every member, sorted: {receipts}");
    assert_eq!(receipts["receipts"][1]["read_up_to"], json!(from_carol));
}

async fn bad_markers_get_errors_and_the_connection_stays(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut mallory = Client::connect(&gateway, "mallory", "phone").await;
    let message = id(&alice.send_to_user("bob", "hi", "k1").await);
    // (frame, expected code, sent by mallory rather than alice)
    let refused = [
        (json!({"type": "mark", "channel": "dm:alice:bob", "read_up_to": message}), "not_member", true),
        (json!({"type": "mark", "channel": "dm:alice:bob", "read_up_to": "12345"}), "invalid_argument", false),
        (json!({"type": "mark", "channel": "dm:alice:bob"}), "invalid_argument", false),
        (json!({"type": "mark", "channel": "dm:alice:bob", "delivered_up_to": "0"}), "invalid_argument", false),
        (json!({"type": "mark", "channel": "g:424242", "read_up_to": message}), "no_such_group", false),
        (json!({"type": "receipts", "channel": "dm:alice:bob"}), "not_member", true),
        (json!({"type": "typing", "channel": "dm:alice:bob"}), "not_member", true),
    ];
    for (frame, code, by_mallory) in refused {
        let client = if by_mallory { &mut mallory } else { &mut alice };
        let reply = client.request(frame.clone()).await;
        assert_eq!((reply["type"].clone(), reply["code"].clone()), (json!("error"), json!(code)), "{frame} -> {reply}");
    }
    // Still connected and served.
    let reply = mallory.request(json!({"type": "overview"})).await;
    assert_eq!(reply["channels"], json!([]), "{reply}");
    let reply = alice.request(json!({"type": "mark", "channel": "dm:alice:bob", "read_up_to": message})).await;
    assert_eq!(reply["type"], "receipt", "{reply}");
}

async fn typing_reaches_the_other_members_and_a_flood_is_limited(backend: Backend) {
    let (gateway, _) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut alice_laptop = Client::connect(&gateway, "alice", "laptop").await;
    let mut bob = Client::connect(&gateway, "bob", "phone").await;
    alice.send_to_user("bob", "hi", "k1").await;
    bob.expect_message().await;
    alice_laptop.expect_message().await;

    alice.send_raw(r#"{"type":"typing","channel":"dm:alice:bob"}"#).await;
    let typing = bob.expect_frame(&["typing"]).await;
    assert_eq!(
        typing,
        json!({"type": "typing", "channel": "dm:alice:bob", "user": "alice", "typing": true, "expires_ms": 6000})
    );
    alice.send_raw(r#"{"type":"typing","channel":"dm:alice:bob","typing":false}"#).await;
    assert_eq!(bob.expect_frame(&["typing"]).await["typing"], false);
    expect_none(&mut alice_laptop, "typing", Duration::from_millis(200)).await;

    // A flood: the burst passes, the rest is refused, the connection stays.
    for n in 0..10 {
        alice.send_raw(&json!({"type": "typing", "channel": "dm:alice:bob", "req": format!("t{n}")}).to_string()).await;
    }
    let mut limited = 0;
    for _ in 0..7 {
        let error = alice.expect_frame(&["error"]).await;
        assert_eq!(error["code"], "rate_limited", "{error}");
        limited += 1;
    }
    assert!(limited >= 7, "at most a burst of 3 of 10 passes");
    let reply = alice.request(json!({"type": "overview"})).await;
    assert_eq!(reply["type"], "overview", "still served: {reply}");

    // Groups larger than the presence fan-out get no typing.
    // 51 members with bob, one more than the presence fan-out's 50.
    let members: Vec<String> = (0..49).map(|n| format!("member{n}")).chain(["alice".to_string()]).collect();
    let big = bob.request(json!({"type": "create_group", "name": "big", "members": members})).await;
    let big = big["group"]["id"].as_str().unwrap_or_else(|| panic!("{big}")).to_string();
    tokio::time::sleep(Duration::from_millis(3100)).await; // the typing bucket refills
    alice.send_raw(&json!({"type": "typing", "channel": big}).to_string()).await;
    let mut small = alice.request(json!({"type": "create_group", "name": "small", "members": ["bob"]})).await;
    let small = small["group"]["id"].take();
    alice.send_raw(&json!({"type": "typing", "channel": small}).to_string()).await;
    // The flood's few that passed came first; then the small group's, never the large one's.
    loop {
        let typing = bob.expect_frame(&["typing"]).await;
        assert_ne!(typing["channel"], json!(big), "the large group's typing was relayed: {typing}");
        if typing["channel"] == small {
            break;
        }
        assert_eq!(typing["channel"], "dm:alice:bob", "{typing}");
    }
}

/// Across gateways: two real gateway processes on one Redis and Cassandra
/// (`gateway.webClient` on); typing and receipts travel through the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_receipts_cross_gateways_and_a_cluster_serves_the_web_client() {
    use common::cluster::{ClusterClient, ClusterSpec, GatewayProcess, PrivateRedis, http_get};

    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 30).await;
    let (one, two) = tokio::join!(GatewayProcess::start(&spec, 0), GatewayProcess::start(&spec, 1));
    let mut alice = ClusterClient::connect(&one.url(), "alice", "phone").await;
    let mut bob = ClusterClient::connect(&two.url(), "bob", "phone").await;
    let wait = Duration::from_secs(10);

    let ack = alice.request(json!({"type": "send", "to": {"user": "bob"}, "text": "hi", "key": "k1"})).await;
    let message = id(&ack);
    bob.wait_for(wait, |f| f["type"] == "message").await.expect("bob gets the message on the other gateway");

    alice.send(json!({"type": "typing", "channel": "dm:alice:bob"}));
    let typing = bob.wait_for(wait, |f| f["type"] == "typing").await.expect("typing crosses gateways");
    assert_eq!((typing["user"].clone(), typing["typing"].clone()), (json!("alice"), json!(true)), "{typing}");

    let reply = bob.request(json!({"type": "mark", "channel": "dm:alice:bob", "read_up_to": message})).await;
    assert_eq!(reply["type"], "receipt", "{reply}");
    let receipt = alice.wait_for(wait, |f| f["type"] == "receipt").await.expect("the receipt crosses gateways");
    assert_eq!((receipt["user"].clone(), receipt["read_up_to"].clone()), (json!("bob"), json!(message)));

    let (status, page) = http_get(one.ws_port, "/").await.expect("the web client answers");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("/web/app.js"), "the web client's page: {page}");
}
