//! Draining a gateway: it stops being ready at once (new connections are
//! refused and pointed at discovery), then moves its clients away at a
//! bounded rate spread over a window: each gets a `reconnect` frame naming
//! another gateway, the reply to any request it has in flight, and a close
//! (1001). Whatever is still connected at the deadline is closed the same
//! way. Nothing acknowledged is lost: clients sync from their cursor where
//! they reconnect, and a session lingers for the offline timeout, so a user
//! who reconnects elsewhere in time never looks offline.
//!
//! A drain the admin API started can be cancelled until it finishes
//! ([`Drain::cancel`]): the gateway is ready again at once and the clients
//! not yet sent away stay. The drain of a shutdown (SIGTERM) cannot: the
//! process waits for it before it exits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Gateway;
use super::discovery::recommend;
use crate::chat::hub::Kick;
use crate::protocol::{ServerFrame, encode_shared};

/// How a drain runs: the window and the rate bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainParams {
    pub deadline: Duration,
    pub max_reconnects_per_second: u32,
}

impl Default for DrainParams {
    fn default() -> Self {
        Self::from(&kubechat_config::Drain::default())
    }
}

/// The config file's drain settings (zeros mean the smallest drain there is).
impl From<&kubechat_config::Drain> for DrainParams {
    fn from(settings: &kubechat_config::Drain) -> Self {
        Self {
            deadline: Duration::from_secs(u64::from(settings.window_seconds.max(1))),
            max_reconnects_per_second: settings.max_reconnects_per_second.max(1),
        }
    }
}

/// The body of `POST /v1/admin/drain` (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DrainRequest {
    pub deadline_seconds: Option<i64>,
    pub max_reconnects_per_second: Option<i64>,
}

pub const MAX_DEADLINE_SECONDS: i64 = 3600;
pub const MAX_RECONNECTS_PER_SECOND: i64 = 100_000;

impl DrainRequest {
    /// The parameters, defaults filled in; an error that says what is allowed.
    pub fn params(&self, defaults: DrainParams) -> Result<DrainParams, String> {
        let deadline = match self.deadline_seconds {
            None => defaults.deadline,
            Some(s) if (1..=MAX_DEADLINE_SECONDS).contains(&s) => Duration::from_secs(s.unsigned_abs()),
            Some(s) => return Err(format!("deadlineSeconds must be 1 to {MAX_DEADLINE_SECONDS}, not {s}")),
        };
        let rate = match self.max_reconnects_per_second {
            None => defaults.max_reconnects_per_second,
            Some(r) if (1..=MAX_RECONNECTS_PER_SECOND).contains(&r) => u32::try_from(r).unwrap_or(u32::MAX),
            Some(r) => {
                return Err(format!("maxReconnectsPerSecond must be 1 to {MAX_RECONNECTS_PER_SECOND}, not {r}"));
            }
        };
        Ok(DrainParams { deadline, max_reconnects_per_second: rate })
    }
}

/// The parameters a `POST /v1/admin/drain` body asks for (an empty body
/// takes the defaults), or the message of a 400.
pub fn parse_drain_body(body: &[u8], defaults: DrainParams) -> Result<DrainParams, String> {
    const EXAMPLE: &str = r#"{"deadlineSeconds": 60, "maxReconnectsPerSecond": 500}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(defaults);
    }
    let request: DrainRequest =
        serde_json::from_slice(body).map_err(|e| format!("the body must be JSON like {EXAMPLE}: {e}"))?;
    request.params(defaults)
}

/// What `GET /v1/admin/drain` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainProgress {
    pub draining: bool,
    /// Every client moved (or closed at the deadline).
    pub finished: bool,
    pub started_at_ms: Option<i64>,
    pub deadline_at_ms: Option<i64>,
    pub max_reconnects_per_second: Option<u32>,
    pub connections_left: u64,
    /// Clients sent away so far (paced, and at the deadline).
    pub moved: u64,
    /// The most clients sent away at the paced rate within one second so far.
    pub observed_max_per_second: u64,
    /// Clients still connected at the deadline, closed then all at once (the
    /// pace fell behind: too many clients for the window at the rate bound,
    /// or an overloaded gateway).
    pub closed_at_deadline: u64,
}

/// Who started a drain, which decides whether it can be cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `POST /v1/admin/drain`: cancellable until it finishes.
    Admin,
    /// The process is stopping (SIGTERM) and waits for the drain.
    Shutdown,
}

/// What [`Drain::cancel`] did (`DELETE /v1/admin/drain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// A running drain stopped after sending `moved` clients away.
    Cancelled { moved: u64 },
    /// No drain was running.
    NotDraining,
    /// The drain had finished (every client moved or closed): it stays.
    Finished,
    /// The process is stopping: its drain runs to the end.
    Stopping,
}

struct Run {
    /// Tells this run's task apart from a later run's (after a cancel).
    id: u64,
    origin: Origin,
    /// Stops this run's task.
    stop: CancellationToken,
    params: DrainParams,
    started: Instant,
    started_at_ms: i64,
    moved: u64,
    /// Clients sent away in each of the last whole seconds (for the observed rate).
    per_second: VecDeque<(u64, u64)>,
    observed_max_per_second: u64,
    closed_at_deadline: u64,
    finished: bool,
}

/// The drain state of one gateway.
#[derive(Default)]
pub struct Drain {
    run: Mutex<Option<Run>>,
    /// Runs started so far (the next run's id).
    runs: std::sync::atomic::AtomicU64,
    finished: tokio::sync::Notify,
}

impl Drain {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Run>> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_draining(&self) -> bool {
        self.lock().is_some()
    }

    pub fn progress(&self, connections_left: u64) -> DrainProgress {
        let run = self.lock();
        match run.as_ref() {
            None => DrainProgress {
                draining: false,
                finished: false,
                started_at_ms: None,
                deadline_at_ms: None,
                max_reconnects_per_second: None,
                connections_left,
                moved: 0,
                observed_max_per_second: 0,
                closed_at_deadline: 0,
            },
            Some(run) => DrainProgress {
                draining: true,
                finished: run.finished,
                started_at_ms: Some(run.started_at_ms),
                deadline_at_ms: Some(
                    run.started_at_ms + i64::try_from(run.params.deadline.as_millis()).unwrap_or(i64::MAX),
                ),
                max_reconnects_per_second: Some(run.params.max_reconnects_per_second),
                connections_left,
                moved: run.moved,
                observed_max_per_second: run.observed_max_per_second,
                closed_at_deadline: run.closed_at_deadline,
            },
        }
    }

    /// Starts draining with `params` unless a drain runs already (a second
    /// call does not restart the clock, but a shutdown makes it its own:
    /// no longer cancellable). True when this call started it.
    pub fn start(gateway: &Arc<Gateway>, params: DrainParams, origin: Origin) -> bool {
        let id = gateway.drain.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stop = CancellationToken::new();
        let started = Instant::now();
        {
            let mut run = gateway.drain.lock();
            if let Some(run) = run.as_mut() {
                if origin == Origin::Shutdown {
                    run.origin = Origin::Shutdown;
                }
                return false;
            }
            *run = Some(Run {
                id,
                origin,
                stop: stop.clone(),
                params,
                started,
                started_at_ms: crate::ids::now_ms(),
                moved: 0,
                per_second: VecDeque::new(),
                observed_max_per_second: 0,
                closed_at_deadline: 0,
                finished: false,
            });
        }
        tracing::info!(
            deadline = ?params.deadline,
            max_reconnects_per_second = params.max_reconnects_per_second,
            connections = gateway.chat.hub().connection_count(),
            "draining: no new connections; moving clients to other gateways"
        );
        gateway.metrics.draining.set(1);
        gateway.report_load();
        // Not on the gateway's task tracker: a shutdown waits for the drain
        // (SIGTERM), not the other way round.
        tokio::spawn(run_drain(gateway.clone(), params, id, started, stop));
        true
    }

    /// Cancels a drain the admin API started and that has not finished:
    /// the gateway is ready again at once (unless something else keeps it
    /// from being ready), discovery recommends it again, and the clients not
    /// yet sent away stay. Those already sent away are gone.
    pub fn cancel(gateway: &Gateway) -> Cancel {
        let outcome = {
            let mut run = gateway.drain.lock();
            match run.as_ref() {
                _ if gateway.shutdown.is_cancelled() => Cancel::Stopping,
                None => Cancel::NotDraining,
                Some(r) if r.origin == Origin::Shutdown => Cancel::Stopping,
                Some(r) if r.finished => Cancel::Finished,
                Some(_) => match run.take() {
                    Some(r) => {
                        r.stop.cancel();
                        Cancel::Cancelled { moved: r.moved }
                    }
                    None => Cancel::NotDraining,
                },
            }
        };
        if let Cancel::Cancelled { moved } = outcome {
            tracing::info!(moved, connections = gateway.chat.hub().connection_count(), "drain cancelled: ready again");
            gateway.metrics.draining.set(0);
            gateway.report_load();
        }
        outcome
    }

    /// Resolves once the drain finished (immediately if it has).
    pub async fn finished(&self) {
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().as_ref().is_some_and(|run| run.finished) {
                return;
            }
            notified.await;
        }
    }

    /// Whether run `id` is still the one running (not cancelled).
    fn is_current(&self, id: u64) -> bool {
        self.lock().as_ref().is_some_and(|run| run.id == id)
    }

    /// `n` clients sent away at `at` by run `id`.
    fn note_moved(&self, id: u64, n: u64, at: Instant) {
        let mut guard = self.lock();
        let Some(run) = guard.as_mut().filter(|run| run.id == id) else { return };
        run.moved += n;
        let second = at.saturating_duration_since(run.started).as_secs();
        match run.per_second.back_mut() {
            Some((s, count)) if *s == second => *count += n,
            _ => run.per_second.push_back((second, n)),
        }
        if run.per_second.len() > 120 {
            run.per_second.pop_front();
        }
        run.observed_max_per_second = run.per_second.iter().map(|(_, c)| *c).max().unwrap_or(0);
    }

    fn note_closed_at_deadline(&self, id: u64, n: u64) {
        if let Some(run) = self.lock().as_mut().filter(|run| run.id == id) {
            run.moved += n;
            run.closed_at_deadline += n;
        }
    }

    fn finish(&self, id: u64) {
        if let Some(run) = self.lock().as_mut().filter(|run| run.id == id) {
            run.finished = true;
        }
        self.finished.notify_waiters();
    }
}

/// How often the drain sends a batch away.
const TICK: Duration = Duration::from_millis(100);

/// How long the deadline's farewell frames get to be written before the
/// drain counts as finished anyway (a client that does not read).
const FAREWELL_WRITE: Duration = Duration::from_secs(2);

/// Sends clients away in batches every [`TICK`]: at the pace that empties
/// the gateway by 80 % of the window, never more than the bound in any
/// second of the drain (counted from its start). A token bucket refilled at
/// that pace sets the batches; it holds up to half a second's worth, so a
/// tick that a busy machine runs late catches up instead of lowering the
/// pace, and tokens are spent only on clients actually sent away. The count
/// of the current second enforces the bound, since a batch leaves only after
/// its reconnect frame is built (a Redis read whose time varies). (A sliding
/// one-second record instead held back a batch whenever that read jittered:
/// ~90-95 % of the bound.)
/// Stops when `stop` is cancelled, sending no one else away.
async fn run_drain(gateway: Arc<Gateway>, params: DrainParams, id: u64, started: Instant, stop: CancellationToken) {
    let deadline = started + params.deadline;
    let finish_by = started + params.deadline.mul_f64(0.8);
    let max_rate = f64::from(params.max_reconnects_per_second);
    let mut pending = gateway.chat.hub().outboxes();
    let mut tokens = 0.0_f64;
    let mut last = Instant::now();
    // (second of the drain, clients sent away in it): the seconds the
    // progress report counts in (`observedMaxPerSecond`).
    let mut this_second = (0_u64, 0_usize);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        pending.retain(|outbox| !outbox.is_closing());
        if pending.is_empty() {
            // Connections that raced with the start of the drain, if any.
            pending = gateway.chat.hub().outboxes();
            pending.retain(|outbox| !outbox.is_closing());
            if pending.is_empty() {
                break;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let left = pending.len() as u64;
            // Everyone left goes at once: spread them over a second.
            let farewell = reconnect_frame(&gateway, "drain deadline reached", 1000).await;
            // Building the frame awaited Redis: the drain may have been cancelled meanwhile.
            if !gateway.drain.is_current(id) {
                return;
            }
            for outbox in &pending {
                outbox.farewell(&farewell, Kick::Reconnect);
            }
            gateway.drain.note_closed_at_deadline(id, left);
            gateway.metrics.drain_moved.inc_by(left);
            tracing::info!(closed = left, "drain deadline: closed the remaining connections");
            // Finished only once those frames are out (or could not be
            // written in time): whoever waits for the drain (SIGTERM) stops
            // the gateway next, and every client must have its frame first.
            let written_by = Instant::now() + FAREWELL_WRITE;
            while pending.iter().any(|outbox| !outbox.farewell_taken()) && Instant::now() < written_by {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            break;
        }
        let time_left = finish_by.saturating_duration_since(now).max(TICK).as_secs_f64();
        let rate = (pending.len() as f64 / time_left).clamp(1.0, max_rate);
        let elapsed = now.duration_since(last).as_secs_f64();
        last = now;
        tokens = (tokens + rate * elapsed).min((max_rate / 2.0).max(1.0));
        let wanted = (tokens.floor() as usize).min(pending.len());
        if wanted == 0 {
            continue;
        }
        // A batch's clients spread over the time the bound gives it (a tick,
        // or more for a catch-up batch after a late tick): arrivals elsewhere
        // follow the bounded rate instead of a longer delay smearing batches together.
        let spread_ms =
            (TICK.as_millis() as u64).max(wanted as u64 * 1000 / u64::from(params.max_reconnects_per_second.max(1)));
        let farewell = reconnect_frame(&gateway, "this gateway is draining", spread_ms).await;
        if !gateway.drain.is_current(id) {
            return;
        }
        let sent_at = Instant::now();
        let second = sent_at.duration_since(started).as_secs();
        if this_second.0 != second {
            this_second = (second, 0);
        }
        let room = (params.max_reconnects_per_second as usize).saturating_sub(this_second.1);
        let batch = wanted.min(room).min(pending.len());
        if batch == 0 {
            // The tokens stay: the batch goes in the next second.
            continue;
        }
        tokens -= batch as f64;
        this_second.1 += batch;
        for outbox in pending.drain(..batch) {
            outbox.farewell(&farewell, Kick::Reconnect);
        }
        gateway.drain.note_moved(id, batch as u64, sent_at);
        gateway.metrics.drain_moved.inc_by(batch as u64);
    }
    if !gateway.drain.is_current(id) {
        return;
    }
    tracing::info!(moved = gateway.drain.progress(0).moved, "drain finished");
    gateway.drain.finish(id);
    gateway.report_load();
}

/// The `reconnect` frame: the gateway discovery recommends now (never this
/// one), and a random delay (up to `within_ms`) so clients do not arrive together.
async fn reconnect_frame(gateway: &Gateway, reason: &str, within_ms: u64) -> crate::protocol::EncodedFrame {
    let loads = gateway.broker.gateway_loads().await.unwrap_or_default();
    let url = recommend(&loads, Some(&gateway.identity.pod), &mut rand_seed()).first().map(|g| g.url.clone());
    encode_shared(&ServerFrame::Reconnect { url, reason: reason.to_string(), within_ms })
}

/// A random seed (for spreading clients over gateways).
pub(crate) fn rand_seed() -> u64 {
    let mut bytes = [0u8; 8];
    // Only spreads clients: a fixed seed if the system has no randomness is fine.
    let _ = getrandom::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_requests_are_checked() {
        let defaults = DrainParams { deadline: Duration::from_secs(60), max_reconnects_per_second: 500 };
        assert_eq!(DrainRequest::default().params(defaults), Ok(defaults));
        let given = DrainRequest { deadline_seconds: Some(10), max_reconnects_per_second: Some(100) };
        assert_eq!(
            given.params(defaults),
            Ok(DrainParams { deadline: Duration::from_secs(10), max_reconnects_per_second: 100 })
        );
        for bad in [
            DrainRequest { deadline_seconds: Some(-1), max_reconnects_per_second: None },
            DrainRequest { deadline_seconds: Some(0), max_reconnects_per_second: None },
            DrainRequest { deadline_seconds: Some(86_400 * 365), max_reconnects_per_second: None },
            DrainRequest { deadline_seconds: None, max_reconnects_per_second: Some(0) },
            DrainRequest { deadline_seconds: None, max_reconnects_per_second: Some(i64::MAX) },
        ] {
            let error = bad.params(defaults).expect_err("refused");
            assert!(error.contains("must be"), "{error}");
        }
    }

    mod bodies {
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::super::*;

        fn any_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
                ".{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-zA-Z]{1,20}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Objects with the real field names (or near misses) and any values.
        fn drain_shaped() -> impl Strategy<Value = Value> {
            let name = prop_oneof![
                Just("deadlineSeconds".to_string()),
                Just("maxReconnectsPerSecond".to_string()),
                "[a-zA-Z]{1,24}",
            ];
            prop::collection::btree_map(name, any_value(), 0..3).prop_map(|m| Value::Object(m.into_iter().collect()))
        }

        fn check(body: &[u8]) -> Result<(), TestCaseError> {
            let defaults = DrainParams::default();
            match parse_drain_body(body, defaults) {
                Ok(params) => {
                    prop_assert!((1..=MAX_DEADLINE_SECONDS.unsigned_abs()).contains(&params.deadline.as_secs()));
                    prop_assert!(
                        (1..=MAX_RECONNECTS_PER_SECOND).contains(&i64::from(params.max_reconnects_per_second))
                    );
                }
                Err(message) => prop_assert!(!message.is_empty()),
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_get_params_or_a_message(body in prop::collection::vec(any::<u8>(), 0..64)) {
                check(&body)?;
            }

            #[test]
            fn any_json_gets_params_or_a_message(value in prop_oneof![any_value(), drain_shaped()]) {
                check(value.to_string().as_bytes())?;
            }

            #[test]
            fn in_range_values_are_taken(deadline in 1..=MAX_DEADLINE_SECONDS, rate in 1..=MAX_RECONNECTS_PER_SECOND) {
                let body = json!({"deadlineSeconds": deadline, "maxReconnectsPerSecond": rate}).to_string();
                let params = parse_drain_body(body.as_bytes(), DrainParams::default());
                prop_assert_eq!(params, Ok(DrainParams {
                    deadline: Duration::from_secs(deadline.unsigned_abs()),
                    max_reconnects_per_second: u32::try_from(rate).unwrap_or(u32::MAX),
                }));
            }
        }
    }

    #[test]
    fn the_observed_rate_counts_per_second() {
        let drain = Drain::default();
        *drain.lock() = Some(Run {
            id: 7,
            origin: Origin::Admin,
            stop: CancellationToken::new(),
            params: DrainParams::default(),
            started: Instant::now(),
            started_at_ms: 0,
            moved: 0,
            per_second: VecDeque::new(),
            observed_max_per_second: 0,
            closed_at_deadline: 0,
            finished: false,
        });
        drain.note_moved(7, 3, Instant::now());
        drain.note_moved(7, 4, Instant::now());
        drain.note_moved(6, 100, Instant::now()); // a cancelled run's late batch
        let progress = drain.progress(10);
        assert_eq!((progress.moved, progress.observed_max_per_second, progress.connections_left), (7, 7, 10));
        assert!(progress.draining && !progress.finished);
        drain.finish(6);
        assert!(!drain.progress(10).finished, "an earlier run does not finish this one");
        drain.finish(7);
        assert!(drain.progress(10).finished);
    }
}
