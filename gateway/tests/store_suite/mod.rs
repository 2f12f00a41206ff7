//! The [`Store`] contract, written once and run against every back-end
//! (`store_embedded.rs`, `store_scylla.rs`): each function takes a fresh,
//! empty store and panics with a message when the contract is broken.

use std::collections::HashSet;
use std::sync::Arc;

use kubechat_gateway::ids::{self, IdGenerator};
use kubechat_gateway::store::{Group, InboxEntry, Join, Markers, Message, NewMessage, Page, Store, StoreError, Stored};

pub fn message(id: u64, channel: &str, sender: &str, text: &str) -> Message {
    Message {
        id,
        channel: channel.into(),
        sender: sender.into(),
        sender_device: format!("{sender}-phone"),
        text: text.into(),
        created_at_ms: ids::timestamp_ms(id),
    }
}

/// A send of `message` under `key` to `recipients` at `position`.
pub fn send(message: &Message, key: &str, recipients: &[&str], position: u64) -> NewMessage {
    NewMessage {
        message: message.clone(),
        key: key.into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect::<Vec<_>>().into(),
        position,
        link_channel: false,
    }
}

pub fn ids_of(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.id).collect()
}

/// A direct message lands in history and in both inboxes, and links the channel.
pub async fn one_to_one_round_trip(store: &dyn Store) {
    let idgen = IdGenerator::new(1, 0);
    let channel = "dm:alice:bob";
    let m = message(idgen.next_id(), channel, "alice", "hi bob ✓ 'quoted' \"json\" \u{1F600}");
    let position = idgen.next_id();
    let new = NewMessage { link_channel: true, ..send(&m, "k1", &["alice", "bob"], position) };

    let stored = store.store_message(new).await.expect("store");
    assert_eq!((stored.message, stored.position, stored.duplicate), (m.clone(), position, false));

    for user in ["alice", "bob"] {
        assert_eq!(
            store.inbox_after(user, 0, 10).await.expect("inbox"),
            vec![InboxEntry { position, message: m.clone() }],
            "inbox of {user}"
        );
        assert_eq!(store.channels_of(user).await.expect("channels"), vec![channel.to_string()]);
    }
    assert!(store.inbox_after("bob", position, 10).await.expect("bob after").is_empty());
    assert!(store.inbox_after("carol", 0, 10).await.expect("carol inbox").is_empty());
    assert_eq!(store.history(channel, Page::Latest, 10).await.expect("history"), vec![m.clone()]);
    assert_eq!(store.message(channel, m.id).await.expect("lookup"), Some(m.clone()));
    assert_eq!(store.message(channel, m.id + 1).await.expect("lookup other id"), None);
    assert_eq!(store.message("dm:alice:carol", m.id).await.expect("lookup other channel"), None);
}

/// A retried key stores nothing new and returns the first message; keys are per sender.
pub async fn a_retried_key_is_stored_once(store: &dyn Store) {
    let idgen = IdGenerator::new(2, 0);
    let first = message(idgen.next_id(), "dm:alice:bob", "alice", "once");
    let position = idgen.next_id();
    store.store_message(send(&first, "k1", &["alice", "bob"], position)).await.expect("store");

    let retry = message(idgen.next_id(), "dm:alice:bob", "alice", "once");
    let again = store.store_message(send(&retry, "k1", &["alice", "bob"], idgen.next_id())).await.expect("retry");
    assert!(again.duplicate, "a retried key is a duplicate");
    assert_eq!(again.message, first, "the duplicate answers with the first message");

    assert_eq!(store.history("dm:alice:bob", Page::Latest, 10).await.expect("history"), vec![first.clone()]);
    assert_eq!(store.inbox_after("bob", 0, 10).await.expect("inbox"), vec![InboxEntry { position, message: first }]);

    // The same key from another sender is another message.
    let bobs = message(idgen.next_id(), "dm:alice:bob", "bob", "mine");
    let stored = store.store_message(send(&bobs, "k1", &["alice", "bob"], idgen.next_id())).await.expect("bob");
    assert!(!stored.duplicate);
    assert_eq!(store.history("dm:alice:bob", Page::Latest, 10).await.expect("history").len(), 2);
}

/// A key reused for a message to another channel is refused, naming the
/// key and the channel it was used for; nothing is written there.
pub async fn a_key_reused_for_another_channel_is_refused(store: &dyn Store) {
    let idgen = IdGenerator::new(4, 0);
    let first = message(idgen.next_id(), "dm:alice:bob", "alice", "to bob");
    store.store_message(send(&first, "k1", &["alice", "bob"], idgen.next_id())).await.expect("store");
    let other = message(idgen.next_id(), "dm:alice:carol", "alice", "to carol, same key");
    match store.store_message(send(&other, "k1", &["alice", "carol"], idgen.next_id())).await {
        Err(StoreError::KeyReused { key, channel }) => {
            assert_eq!((key.as_str(), channel.as_str()), ("k1", "dm:alice:bob"))
        }
        other => panic!("a key reused for another channel must be refused: {other:?}"),
    }
    assert!(store.history("dm:alice:carol", Page::Latest, 10).await.expect("history").is_empty());
    assert!(store.inbox_after("carol", 0, 10).await.expect("inbox").is_empty());
    // The same key to the same channel is still the first message's retry.
    let again = store.store_message(send(&first, "k1", &["alice", "bob"], idgen.next_id())).await.expect("retry");
    assert!(again.duplicate && again.message.id == first.id);
}

/// Concurrent retries of one key (as a client reconnecting in a hurry
/// might send): exactly one is stored, every answer carries its id.
pub async fn racing_retries_store_one_message(store: Arc<dyn Store>) {
    let idgen = Arc::new(IdGenerator::new(3, 0));
    let racers: Vec<_> = (0..20)
        .map(|i| {
            let (store, idgen) = (Arc::clone(&store), Arc::clone(&idgen));
            tokio::spawn(async move {
                let m = message(idgen.next_id(), "g:race", "carol", &format!("attempt {i}"));
                store.store_message(send(&m, "race", &["carol", "dave"], idgen.next_id())).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for racer in racers {
        answers.push(racer.await.expect("join").expect("store"));
    }
    let fresh: Vec<&Stored> = answers.iter().filter(|a| !a.duplicate).collect();
    assert_eq!(fresh.len(), 1, "exactly one attempt is stored: {answers:?}");
    let id = fresh[0].message.id;
    assert!(answers.iter().all(|a| a.message.id == id), "every answer names the stored id {id}: {answers:?}");
    assert_eq!(ids_of(&store.history("g:race", Page::Latest, 50).await.expect("history")), vec![id]);
    assert_eq!(store.inbox_after("dave", 0, 50).await.expect("inbox").len(), 1);
}

/// Pages of an inbox cover every entry once, in position order, and never
/// show another user's entries.
pub async fn inbox_pages_cover_every_entry_once_in_order(store: &dyn Store) {
    let idgen = IdGenerator::new(4, 0);
    let mut positions = Vec::new();
    for i in 0..250 {
        let m = message(idgen.next_id(), "g:1", "alice", &format!("m{i}"));
        let position = idgen.next_id();
        positions.push(position);
        // Users whose names extend or precede "u" must not leak into its inbox.
        store.store_message(send(&m, &format!("k{i}"), &["u", "uu", "t"], position)).await.expect("store");
    }

    let mut cursor = 0;
    let mut got = Vec::new();
    let mut pages = Vec::new();
    // Bounded, so a cursor that does not advance fails instead of hanging.
    for _ in 0..10 {
        let page = store.inbox_after("u", cursor, 100).await.expect("page");
        pages.push(page.len());
        let Some(last) = page.last() else { break };
        cursor = last.position;
        got.extend(page.iter().map(|e| e.position));
        assert!(page.iter().all(|e| e.message.channel == "g:1" && e.message.sender == "alice"));
    }
    assert_eq!(pages, vec![100, 100, 50, 0]);
    assert_eq!(got, positions, "every position once, ascending");
    assert_eq!(store.inbox_after("u", 0, 0).await.expect("limit 0"), vec![]);
    assert_eq!(store.inbox_after("uu", 0, 1000).await.expect("uu").len(), 250);
}

/// History pages newest-first (`Latest`, `Before`) and oldest-first (`After`).
pub async fn history_pages_both_ways(store: &dyn Store) {
    let idgen = IdGenerator::new(5, 0);
    let mut written = Vec::new();
    for i in 0..120 {
        let m = message(idgen.next_id(), "g:1", "alice", &format!("m{i}"));
        store.store_message(send(&m, &format!("k{i}"), &[], 0)).await.expect("store");
        written.push(m.id);
        // Neighbouring channels (by key order) must stay out of g:1's pages.
        for other in ["g:10", "g:0"] {
            let noise = message(idgen.next_id(), other, "bob", "noise");
            store.store_message(send(&noise, &format!("{other}{i}"), &[], 0)).await.expect("store noise");
        }
    }
    let mut newest_first = written.clone();
    newest_first.reverse();

    let mut got = ids_of(&store.history("g:1", Page::Latest, 50).await.expect("latest"));
    let mut pages = vec![got.len()];
    for _ in 0..10 {
        let before = *got.last().expect("non-empty");
        let page = ids_of(&store.history("g:1", Page::Before(before), 50).await.expect("before"));
        pages.push(page.len());
        if page.is_empty() {
            break;
        }
        got.extend(page);
    }
    assert_eq!(pages, vec![50, 50, 20, 0]);
    assert_eq!(got, newest_first);

    let after = ids_of(&store.history("g:1", Page::After(written[59]), 1000).await.expect("after"));
    assert_eq!(after, written[60..].to_vec());
    let first = ids_of(&store.history("g:1", Page::After(0), 10).await.expect("after 0"));
    assert_eq!(first, written[..10].to_vec());
    assert!(store.history("g:1", Page::Before(written[0]), 10).await.expect("before first").is_empty());
    assert!(store.history("g:1", Page::After(written[119]), 10).await.expect("after last").is_empty());
    assert!(store.history("g:2", Page::Latest, 10).await.expect("empty channel").is_empty());
}

/// Groups, their members and every user's channel list, both directions.
pub async fn groups_members_and_channels(store: &dyn Store) {
    let group = Group { id: "g:1".into(), name: "team".into(), owner: "user-050".into(), created_at_ms: 1 };
    // Written in a scrambled order; read back sorted.
    let members: Vec<String> = (0..100).map(|i| format!("user-{:03}", (i * 37) % 100)).collect();
    store.create_group(&group, &members).await.expect("create");
    let other = Group { id: "g:10".into(), name: "other".into(), owner: "zed".into(), created_at_ms: 2 };
    store.create_group(&other, &["zed".to_string(), "user-001".to_string()]).await.expect("create other");

    let mut sorted = members.clone();
    sorted.sort();
    assert_eq!(store.members("g:1").await.expect("members"), sorted);
    assert_eq!(store.group("g:1").await.expect("group"), Some(group));
    assert_eq!(store.group("g:2").await.expect("missing group"), None);

    store.add_member("g:1", "zed").await.expect("add");
    store.remove_member("g:1", "user-000").await.expect("remove");
    let members = store.members("g:1").await.expect("members after");
    assert_eq!(members.len(), 100);
    assert!(members.contains(&"zed".to_string()) && !members.contains(&"user-000".to_string()));
    assert_eq!(store.members("g:10").await.expect("other members"), vec!["user-001", "zed"]);
    assert_eq!(store.channels_of("user-000").await.expect("removed user"), Vec::<String>::new());
    let both = store.members_of(&["g:1".into(), "g:10".into(), "g:none".into()]).await.expect("members of groups");
    assert_eq!(both.len(), 3);
    assert_eq!(both["g:1"], members);
    assert_eq!(both["g:10"], vec!["user-001", "zed"]);
    assert!(both["g:none"].is_empty(), "an unknown group has no members");

    let dm = message(IdGenerator::new(6, 0).next_id(), "dm:user-001:zed", "zed", "hi");
    let new = NewMessage { link_channel: true, ..send(&dm, "k", &["user-001", "zed"], dm.id + 1) };
    store.store_message(new).await.expect("direct message");
    assert_eq!(store.channels_of("user-001").await.expect("channels"), vec!["dm:user-001:zed", "g:1", "g:10"]);
    assert_eq!(store.channels_of("zed").await.expect("channels"), vec!["dm:user-001:zed", "g:1", "g:10"]);
    store.remove_member("g:10", "zed").await.expect("remove from other");
    assert_eq!(store.channels_of("zed").await.expect("channels"), vec!["dm:user-001:zed", "g:1"]);
}

/// A group one short of its limit: of ten users joining at once, at most one
/// gets in and the group never passes the limit; a member joining again is
/// no change; ownership can be handed on.
pub async fn the_member_limit_holds_under_racing_joins(store: Arc<dyn Store>) {
    let group = Group { id: "g:limit".into(), name: "limit".into(), owner: "m0".into(), created_at_ms: 1 };
    let members: Vec<String> = (0..9).map(|i| format!("m{i}")).collect();
    store.create_group(&group, &members).await.expect("create");
    let joins: Vec<_> = (0..10)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.join("g:limit", &format!("late{i}"), 10).await })
        })
        .collect();
    let mut added = 0;
    for join in joins {
        match join.await.expect("join task").expect("join") {
            Join::Added => added += 1,
            Join::Full { members } => assert!(members >= 10 - added, "a refusal names the size: {members}"),
            Join::AlreadyMember => panic!("nobody joined twice"),
        }
    }
    let now = store.members("g:limit").await.expect("members");
    assert!(added <= 1, "{added} joined a group with one place left");
    assert_eq!(now.len(), 9 + added, "{now:?}");
    assert_eq!(store.join("g:limit", "m1", 10).await.expect("again"), Join::AlreadyMember);
    if added == 0 {
        assert_eq!(store.join("g:limit", "late-after", 10).await.expect("the last place"), Join::Added);
    }
    assert_eq!(store.join("g:limit", "one-too-many", 10).await.expect("full"), Join::Full { members: 10 });

    store.set_owner("g:limit", "m5").await.expect("hand on");
    let found = store.group("g:limit").await.expect("group").expect("exists");
    assert_eq!((found.owner.as_str(), found.name.as_str()), ("m5", "limit"), "only the owner changed");
    assert_eq!(store.members("g:limit").await.expect("members").len(), 10);
}

/// Many concurrent senders: every message lands once, in history and inboxes.
pub async fn concurrent_senders_all_land(store: Arc<dyn Store>, tasks: usize, per_task: usize) {
    let idgen = Arc::new(IdGenerator::new(7, 0));
    let writers: Vec<_> = (0..tasks)
        .map(|t| {
            let (store, idgen) = (Arc::clone(&store), Arc::clone(&idgen));
            tokio::spawn(async move {
                let user = format!("w{t}");
                let channel = format!("dm:peer:{user}");
                for i in 0..per_task {
                    let m = message(idgen.next_id(), &channel, &user, &format!("hello {i}"));
                    store.store_message(send(&m, &format!("k{i}"), &[&user, "peer"], idgen.next_id())).await?;
                }
                Ok::<_, kubechat_gateway::store::StoreError>(())
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("join").expect("every write succeeds");
    }
    let mut all_ids = HashSet::new();
    for t in 0..tasks {
        let history = store.history(&format!("dm:peer:w{t}"), Page::Latest, per_task + 1).await.expect("history");
        assert_eq!(history.len(), per_task);
        all_ids.extend(ids_of(&history));
        assert_eq!(store.inbox_after(&format!("w{t}"), 0, per_task + 1).await.expect("inbox").len(), per_task);
    }
    assert_eq!(all_ids.len(), tasks * per_task);
    assert_eq!(store.inbox_after("peer", 0, tasks * per_task + 1).await.expect("peer inbox").len(), tasks * per_task);
}

/// Read markers only move forward, read implies delivered, and each user's
/// and each channel's markers read back as written.
pub async fn markers_only_move_forward(store: &dyn Store) {
    let mark = |delivered_up_to, read_up_to| Markers { delivered_up_to, read_up_to };
    let idgen = IdGenerator::new(1, 0);
    let (first, second, third) = (idgen.next_id(), idgen.next_id(), idgen.next_id());
    let channel = "dm:alice:bob";
    assert!(store.markers_of("bob").await.expect("none yet").is_empty());

    store.advance_markers("bob", channel, mark(second, 0)).await.expect("delivered");
    store.advance_markers("bob", channel, mark(first, first)).await.expect("read the first");
    assert_eq!(store.markers_of("bob").await.expect("markers")[channel], mark(second, first));

    // Backwards: nothing changes.
    store.advance_markers("bob", channel, mark(first, 0)).await.expect("delivered backwards");
    assert_eq!(store.markers_of("bob").await.expect("markers")[channel], mark(second, first));

    // Read past delivered: delivered follows.
    store.advance_markers("bob", channel, mark(0, third)).await.expect("read the third");
    assert_eq!(store.markers_of("bob").await.expect("markers")[channel], mark(third, third));

    store.advance_markers("alice", channel, mark(first, 0)).await.expect("alice");
    store.advance_markers("alice", "g:1", mark(second, second)).await.expect("alice in a group");
    let alice = store.markers_of("alice").await.expect("alice's markers");
    assert_eq!(alice.len(), 2, "{alice:?}");
    assert_eq!(alice["g:1"], mark(second, second));
    let users = ["bob".to_string(), "carol".to_string(), "alice".to_string()];
    assert_eq!(
        store.channel_markers(channel, &users).await.expect("channel markers"),
        vec![mark(third, third), Markers::default(), mark(first, 0)],
        "in the order asked, the default for a user without markers"
    );
    assert!(store.channel_markers(channel, &[]).await.expect("nobody").is_empty());
}
