//! Device registration: which devices of a user get notifications, kept in
//! Redis. The gateway registers and unregisters them (`register_push`,
//! `logout`); the workers read them and drop the ones a provider rejected.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::names::{InvalidTarget, Platform, PushTarget, valid_name};

/// Devices one user may register; more are refused.
pub const MAX_TARGETS_PER_USER: usize = 32;

/// Redis hash of a user's push targets.
/// Tagged with the user id, as the broker's keys of the user are.
pub fn targets_key(user: &str) -> String {
    format!("kubechat:push-targets:{{{user}}}")
}

/// Marker set once `message_id` was delivered to `device` from `stream`
/// (in the stream's slot: checked in one step with the entry's attempts).
pub fn pushed_key(stream: &str, message_id: &str, device: &str) -> String {
    format!("{stream}-pushed:{message_id}:{device}")
}

/// The value stored in the targets hash.
#[derive(Serialize, Deserialize)]
struct StoredTarget {
    platform: Platform,
    token: String,
}

/// How a target is kept in Redis.
trait Stored: Sized {
    fn to_json(&self) -> String;
    fn from_json(device: &str, value: &str) -> Result<Self, PushTargetError>;
}

impl Stored for PushTarget {
    fn to_json(&self) -> String {
        let stored = StoredTarget { platform: self.platform, token: self.token.clone() };
        // A struct of a plain enum and a string always serializes.
        serde_json::to_string(&stored).unwrap_or_default()
    }

    fn from_json(device: &str, value: &str) -> Result<Self, PushTargetError> {
        let stored: StoredTarget = serde_json::from_str(value)
            .map_err(|e| PushTargetError::Invalid(format!("stored target of device {device}: {e}")))?;
        Ok(Self { device: device.to_string(), platform: stored.platform, token: stored.token })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushTargetError {
    #[error("invalid push target: {0}")]
    Invalid(String),
    #[error("too many push targets: at most {MAX_TARGETS_PER_USER} devices per user")]
    TooMany,
    #[error("push notifications need a cluster gateway (Redis and push workers); this gateway is standalone")]
    NotConfigured,
    #[error("push targets (Redis): {0}")]
    Redis(#[from] redis::RedisError),
}

impl From<InvalidTarget> for PushTargetError {
    fn from(InvalidTarget(why): InvalidTarget) -> Self {
        PushTargetError::Invalid(why)
    }
}

fn check_user(user: &str) -> Result<(), PushTargetError> {
    if valid_name(user) {
        Ok(())
    } else {
        Err(PushTargetError::Invalid("user ids are 1–64 of [A-Za-z0-9_.@-]".into()))
    }
}

/// Registers (or replaces) `target` for `user`: notifications for the user go to this device
/// from now on. Refuses a new device beyond [`MAX_TARGETS_PER_USER`].
pub async fn register_target<C>(conn: &mut C, user: &str, target: &PushTarget) -> Result<(), PushTargetError>
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    check_user(user)?;
    target.validate()?;
    let key = targets_key(user);
    // Check-then-set: two concurrent registrations of new devices may overshoot the limit by
    // one, which is harmless; the worker reads at most the limit anyway.
    let (exists, len): (bool, usize) = redis::pipe().hexists(&key, &target.device).hlen(&key).query_async(conn).await?;
    if !exists && len >= MAX_TARGETS_PER_USER {
        return Err(PushTargetError::TooMany);
    }
    let _: () = conn.hset(&key, &target.device, target.to_json()).await?;
    Ok(())
}

/// Forgets `device` of `user`; returns whether it was registered.
pub async fn unregister_target<C>(conn: &mut C, user: &str, device: &str) -> Result<bool, PushTargetError>
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    check_user(user)?;
    let removed: usize = conn.hdel(targets_key(user), device).await?;
    Ok(removed > 0)
}

/// Forgets `target` only if the device is still registered with the same platform and token
/// (a device that re-registered meanwhile keeps its new token). For tokens a provider rejected
/// as unregistered.
pub async fn unregister_stale_target<C>(conn: &mut C, user: &str, target: &PushTarget) -> Result<bool, PushTargetError>
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    let script = redis::Script::new(
        r"if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
          return 0",
    );
    let removed: usize =
        script.key(targets_key(user)).arg(&target.device).arg(target.to_json()).invoke_async(conn).await?;
    Ok(removed > 0)
}

/// The user's registered targets, sorted by device id. Entries that do not parse are skipped
/// (and logged); at most [`MAX_TARGETS_PER_USER`] are returned.
pub async fn targets<C>(conn: &mut C, user: &str) -> Result<Vec<PushTarget>, PushTargetError>
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    check_user(user)?;
    let raw: HashMap<String, String> = conn.hgetall(targets_key(user)).await?;
    let mut targets: Vec<PushTarget> = raw
        .iter()
        .filter_map(|(device, value)| match PushTarget::from_json(device, value) {
            Ok(target) => Some(target),
            Err(e) => {
                tracing::warn!(user, device, error = %e, "skipping an unreadable push target");
                None
            }
        })
        .collect();
    targets.sort_by(|a, b| a.device.cmp(&b.device));
    targets.truncate(MAX_TARGETS_PER_USER);
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_through_their_stored_form() {
        let target = PushTarget::new("phone", Platform::Fcm, "tok-1");
        let json = target.to_json();
        assert_eq!(json, r#"{"platform":"fcm","token":"tok-1"}"#);
        assert_eq!(PushTarget::from_json("phone", &json).expect("parse"), target);
        assert!(PushTarget::from_json("phone", r#"{"platform":"pager","token":"x"}"#).is_err());
    }
}
