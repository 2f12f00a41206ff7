//! The vocabulary the gateway's protocol and the push workers share: user
//! and device ids and how a device is reached. A leaf: it depends on nothing
//! in the crate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest user or device id.
pub const MAX_NAME_LEN: usize = 64;

/// Longest device token accepted (FCM tokens are ~160 bytes, APNs 64 hex chars; webhooks may
/// use longer opaque values).
pub const MAX_TOKEN_LEN: usize = 4096;

/// Whether `name` is a valid user or device id: 1–64 of `[A-Za-z0-9_.@-]`.
/// (`:` is excluded so direct channel ids `dm:<a>:<b>` are unambiguous.)
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// A push target or platform that cannot be accepted, and why.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTarget(pub String);

/// How a device is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Webhook,
    Fcm,
    Apns,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Webhook, Platform::Fcm, Platform::Apns];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Webhook => "webhook",
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Platform {
    type Err = InvalidTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "webhook" => Ok(Platform::Webhook),
            "fcm" => Ok(Platform::Fcm),
            "apns" => Ok(Platform::Apns),
            other => Err(InvalidTarget(format!("unknown platform {other:?}"))),
        }
    }
}

/// One registered device of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushTarget {
    /// The device id (as in the client's token).
    pub device: String,
    pub platform: Platform,
    /// FCM registration token, APNs device token (hex), or an opaque value passed to the webhook.
    pub token: String,
}

impl PushTarget {
    pub fn new(device: impl Into<String>, platform: Platform, token: impl Into<String>) -> Self {
        Self { device: device.into(), platform, token: token.into() }
    }

    pub fn validate(&self) -> Result<(), InvalidTarget> {
        if !valid_name(&self.device) {
            return Err(InvalidTarget("device ids are 1–64 of [A-Za-z0-9_.@-]".into()));
        }
        if self.token.is_empty() || self.token.len() > MAX_TOKEN_LEN {
            return Err(InvalidTarget(format!("the token must be 1–{MAX_TOKEN_LEN} bytes")));
        }
        if self.token.chars().any(char::is_control) {
            return Err(InvalidTarget("the token must not contain control characters".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_validated() {
        assert!(PushTarget::new("phone", Platform::Apns, "ab12").validate().is_ok());
        assert!(PushTarget::new("", Platform::Apns, "ab12").validate().is_err());
        assert!(PushTarget::new("a:b", Platform::Apns, "ab12").validate().is_err());
        assert!(PushTarget::new("phone", Platform::Apns, "").validate().is_err());
        assert!(PushTarget::new("phone", Platform::Apns, "a\nb").validate().is_err());
        assert!(PushTarget::new("phone", Platform::Apns, "x".repeat(MAX_TOKEN_LEN + 1)).validate().is_err());
        assert_eq!("apns".parse::<Platform>().expect("parse"), Platform::Apns);
        assert!("sms".parse::<Platform>().is_err());
    }
}
