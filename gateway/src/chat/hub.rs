//! The connections of this gateway, by user and device: where live
//! messages go. Each connection has a bounded outbound queue; a connection
//! whose queue is full is closed (it resyncs from its cursor after
//! reconnecting, so nothing is lost) instead of growing memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a connection's outbound queue holds.
pub type Outbound = crate::protocol::EncodedFrame;

/// Why a connection was closed by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    SlowConsumer,
    LoggedOut,
}

#[derive(Clone)]
struct Device {
    device: String,
    connection: u64,
    tx: mpsc::Sender<Outbound>,
    kick: CancellationToken,
    reason: Arc<std::sync::Mutex<Option<Kick>>>,
}

#[derive(Default)]
pub struct Hub {
    users: DashMap<String, Vec<Device>>,
    next_connection: AtomicU64,
}

/// A registered connection; unregisters itself when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    user: String,
    pub connection: u64,
    /// Cancelled when the server wants this connection closed.
    pub kicked: CancellationToken,
    reason: Arc<std::sync::Mutex<Option<Kick>>>,
}

impl Registration {
    pub fn kick_reason(&self) -> Option<Kick> {
        self.reason.lock().ok().and_then(|r| *r)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.user, self.connection);
    }
}

fn kick(device: &Device, why: Kick) {
    if let Ok(mut reason) = device.reason.lock() {
        reason.get_or_insert(why);
    }
    device.kick.cancel();
}

fn queue_on(devices: &[Device], frame: &Outbound, skip: Option<u64>) -> Delivered {
    let mut result = Delivered::default();
    for device in devices.iter().filter(|d| Some(d.connection) != skip) {
        match device.tx.try_send(frame.clone()) {
            Ok(()) => result.queued += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                kick(device, Kick::SlowConsumer);
                result.overflowed += 1;
            }
            // The connection is closing; it unregisters itself.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
    result
}

/// What one delivery attempt did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Connections the frame was queued on.
    pub queued: usize,
    /// Connections closed because their queue was full.
    pub overflowed: usize,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn register(self: &Arc<Self>, user: &str, device: &str, tx: mpsc::Sender<Outbound>) -> Registration {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let kicked = CancellationToken::new();
        let reason = Arc::new(std::sync::Mutex::new(None));
        let entry = Device { device: device.to_string(), connection, tx, kick: kicked.clone(), reason: reason.clone() };
        self.users.entry(user.to_string()).or_default().push(entry);
        Registration { hub: self.clone(), user: user.to_string(), connection, kicked, reason }
    }

    fn unregister(&self, user: &str, connection: u64) {
        if let dashmap::Entry::Occupied(mut devices) = self.users.entry(user.to_string()) {
            devices.get_mut().retain(|d| d.connection != connection);
            if devices.get().is_empty() {
                devices.remove();
            }
        }
    }

    /// Queues `frame` on every connection of `user` except `skip`.
    pub fn deliver(&self, user: &str, frame: &Outbound, skip: Option<u64>) -> Delivered {
        self.users.get(user).map(|devices| queue_on(&devices, frame, skip)).unwrap_or_default()
    }

    /// Queues `frame` on every connection here (a `resync` after live
    /// delivery was interrupted).
    pub fn broadcast(&self, frame: &Outbound) -> Delivered {
        let mut result = Delivered::default();
        // Delivering from inside the iteration: a second lookup of the same
        // shard while iterating could wait behind a writer.
        for devices in self.users.iter() {
            let delivered = queue_on(&devices, frame, None);
            result.queued += delivered.queued;
            result.overflowed += delivered.overflowed;
        }
        result
    }

    // Presence is the broker's job now; these three only let tests look inside.
    #[cfg(test)]
    fn is_online(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|d| !d.is_empty())
    }

    #[cfg(test)]
    fn devices(&self, user: &str) -> Vec<String> {
        self.users.get(user).map(|d| d.iter().map(|d| d.device.clone()).collect()).unwrap_or_default()
    }

    /// Closes the connections of one device of `user` (its logout).
    pub fn kick_device(&self, user: &str, device: &str, why: Kick) {
        if let Some(devices) = self.users.get(user) {
            devices.iter().filter(|d| d.device == device).for_each(|d| kick(d, why));
        }
    }

    #[cfg(test)]
    fn connection_count(&self) -> usize {
        self.users.iter().map(|d| d.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_every_device_but_the_sender() {
        let hub = Hub::new();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let phone = hub.register("alice", "phone", tx1);
        let _laptop = hub.register("alice", "laptop", tx2);
        let frame = Outbound::from_static("hi");
        assert_eq!(hub.deliver("alice", &frame, Some(phone.connection)).queued, 1);
        assert_eq!(rx2.recv().await.as_deref(), Some("hi"));
        assert!(rx1.try_recv().is_err());
        assert_eq!(hub.devices("alice").len(), 2);
    }

    #[tokio::test]
    async fn a_full_queue_kicks_the_connection() {
        let hub = Hub::new();
        let (tx, _rx) = mpsc::channel(1);
        let registration = hub.register("bob", "phone", tx);
        let frame = Outbound::from_static("x");
        assert_eq!(hub.deliver("bob", &frame, None).queued, 1);
        assert_eq!(hub.deliver("bob", &frame, None).overflowed, 1);
        assert!(registration.kicked.is_cancelled());
        assert_eq!(registration.kick_reason(), Some(Kick::SlowConsumer));
    }

    #[test]
    fn dropping_the_registration_unregisters() {
        let hub = Hub::new();
        let (tx, _rx) = mpsc::channel(1);
        let registration = hub.register("carol", "web", tx);
        assert!(hub.is_online("carol"));
        drop(registration);
        assert!(!hub.is_online("carol"));
        assert_eq!(hub.connection_count(), 0);
    }
}
