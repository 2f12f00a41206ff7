//! Chat traffic between pairs of users across gateways, with the
//! disruption a test brings (a gateway, Redis or a store node killed), and
//! the audit of what every acked message came to.

use std::time::{Duration, Instant};

use serde_json::json;

use super::cluster::{ClusterClient, Received};

/// Connects to the first gateway that answers, trying `urls` from `first` on.
pub async fn connect_any(urls: &[String], first: usize, user: &str, device: &str) -> ClusterClient {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let url = &urls[(first + attempt) % urls.len()];
        match ClusterClient::try_connect(url, user, device).await {
            Ok(client) => return client,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(30), "{user}/{device}: no gateway accepts ({e})");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What one sender did: keys tried and the ids acked for them.
pub struct Sent {
    pub sent: usize,
    pub acked: Vec<String>,
    pub retries: usize,
    /// The longest a send took from its first attempt to its ack.
    pub longest: Duration,
}

/// Sends `count` messages to `to`, one at a time; on a lost connection or
/// an error, reconnects (to another gateway if its own is gone) and retries
/// with the same key, as a real client does.
pub async fn send_loop(urls: Vec<String>, home: usize, user: String, to: String, count: usize) -> Sent {
    let mut client = connect_any(&urls, home, &user, "phone").await;
    let mut result = Sent { sent: 0, acked: Vec::new(), retries: 0, longest: Duration::ZERO };
    let mut next_gateway = home + 1;
    for n in 0..count {
        result.sent += 1;
        let frame = json!({"type":"send","to":{"user":to},"text":format!("{user} #{n}"),"key":format!("{user}-{n}")});
        let first_attempt = Instant::now();
        loop {
            match client.try_request(frame.clone(), Duration::from_secs(8)).await {
                Some(ack) if ack["type"] == "ack" => {
                    result.acked.push(ack["id"].as_str().expect("ack id").to_string());
                    result.longest = result.longest.max(first_attempt.elapsed());
                    break;
                }
                reply => {
                    result.retries += 1;
                    if client.closed.is_some() || reply.is_none() {
                        client = connect_any(&urls, next_gateway, &user, "phone").await;
                        next_gateway += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    result
}

/// What one receiving device got.
pub struct Got {
    pub received: Received,
    /// Messages it got only from its last sync, after the traffic stopped:
    /// neither delivered live nor announced by a `resync` while it was
    /// connected (it would have waited for its next reconnect).
    pub stranded: std::collections::HashSet<String>,
    pub reconnects: usize,
    pub resyncs: usize,
    /// Every cursor stored, with when (for diagnosing a loss).
    pub cursors: Vec<(String, u128)>,
}

/// Receives until `stop`: live messages, a sync on `resync`, a reconnect
/// (elsewhere) and a sync from its cursor when the connection drops; then a
/// last sync from the cursor it kept, as a device does on its next start.
pub async fn receive_loop(
    urls: Vec<String>,
    home: usize,
    user: String,
    stop: tokio_util::sync::CancellationToken,
) -> Got {
    let mut client = connect_any(&urls, home, &user, "phone").await;
    let mut got = Got {
        received: Received::default(),
        stranded: Default::default(),
        reconnects: 0,
        resyncs: 0,
        cursors: Vec::new(),
    };
    let (entries, mut cursor) = client.sync_all("0").await.expect("first sync");
    got.received.note_synced(&entries);
    let mut next_gateway = home + 1;
    let mut finishing = false;
    loop {
        if stop.is_cancelled() && !finishing {
            finishing = true;
            client.drain_for(Duration::from_secs(1)).await;
        }
        if !finishing {
            client.receive_one(Duration::from_millis(200)).await;
        }
        got.received.note_live(client.take("message"));
        let resync = !client.take("resync").is_empty();
        // Presence changes and late replies are of no interest here.
        client.backlog.clear();
        got.resyncs += usize::from(resync);
        if client.closed.is_some() {
            got.reconnects += 1;
            client = connect_any(&urls, next_gateway, &user, "phone").await;
            next_gateway += 1;
        } else if !resync && !finishing {
            continue;
        }
        match client.sync_all(&cursor).await {
            Some((entries, next)) => {
                if finishing {
                    let ids = entries.iter().filter_map(|e| e["message"]["id"].as_str());
                    got.stranded.extend(ids.filter(|id| !got.received.has(id)).map(str::to_string));
                }
                got.received.note_synced(&entries);
                cursor = next;
                got.cursors.push((
                    cursor.clone(),
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()),
                ));
                if finishing {
                    return got;
                }
            }
            None => continue,
        }
    }
}

/// What a run of [`traffic_through`] came to.
#[derive(Debug, Default)]
pub struct Totals {
    pub sent: usize,
    pub acked: usize,
    pub live: usize,
    /// Got by a sync (after a reconnect or a `resync`, or the last one).
    pub recovered: usize,
    /// Got only by the last sync (see [`Got::stranded`]).
    pub stranded: usize,
    pub lost: usize,
    /// Sends answered with an error or not at all, then retried.
    pub retries: usize,
    /// The longest a send took from its first attempt to its ack.
    pub longest_send: Duration,
}

/// Traffic between pairs across gateways while `disrupt` runs.
pub async fn traffic_through<F: std::future::Future<Output = ()>>(
    urls: &[String],
    pairs: &[(usize, usize)],
    per_sender: usize,
    disrupt: F,
) -> Totals {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (i, &(from, to)) in pairs.iter().enumerate() {
        receivers.push(tokio::spawn(receive_loop(urls.to_vec(), to, format!("rcpt{i}"), stop.clone())));
        tokio::time::sleep(Duration::from_millis(200)).await;
        senders.push(tokio::spawn(send_loop(urls.to_vec(), from, format!("sndr{i}"), format!("rcpt{i}"), per_sender)));
    }
    disrupt.await;
    let mut sent = Vec::new();
    for sender in senders {
        sent.push(sender.await.expect("sender task"));
    }
    stop.cancel();
    let mut totals = Totals::default();
    for (i, receiver) in receivers.into_iter().enumerate() {
        let got = receiver.await.expect("receiver task");
        let sender = &sent[i];
        totals.sent += sender.sent;
        totals.acked += sender.acked.len();
        totals.retries += sender.retries;
        totals.longest_send = totals.longest_send.max(sender.longest);
        for id in &sender.acked {
            if got.received.live.contains_key(id) {
                totals.live += 1;
            } else if got.received.synced.contains(id) {
                totals.recovered += 1;
                if got.stranded.contains(id) {
                    totals.stranded += 1;
                    let at = id.parse::<u64>().map(kubechat_gateway::ids::timestamp_ms).unwrap_or_default();
                    let (from, to) = pairs[i];
                    println!(
                        "STRANDED {id} (stored at {at} ms) for rcpt{i}: sender on gateway {from}, receiver on {to}"
                    );
                }
            } else {
                totals.lost += 1;
                let mut audit = ClusterClient::connect(&urls[0], &format!("rcpt{i}"), "audit").await;
                let (all, _) = audit.sync_all("0").await.expect("audit sync");
                let position = all.iter().find(|e| e["message"]["id"] == json!(id)).map(|e| e["position"].clone());
                println!("LOST {id} for rcpt{i}: inbox position {position:?}; cursors stored: {:?}", got.cursors);
            }
        }
        println!(
            "pair {i}: sent {}, acked {}, sender retries {}, receiver reconnects {}, resyncs {}, stranded {}",
            sender.sent,
            sender.acked.len(),
            sender.retries,
            got.reconnects,
            got.resyncs,
            got.stranded.len()
        );
    }
    totals
}
