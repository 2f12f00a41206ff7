//! The job format: what the gateway (producer) appends to the stream and the
//! push workers (consumers) read. Defined here once for both.

use serde::{Deserialize, Serialize};

/// The stream the push workers consume. Its hash tag `{push}` is shared by
/// every key the workers keep about its entries (attempts, sent markers,
/// the dead-letter stream), so that one step touching several of them runs
/// on one node of a Redis Cluster.
pub const PUSH_STREAM: &str = "kubechat:{push}";
/// The stream entry's field holding the job (JSON).
pub const JOB_FIELD: &str = "job";

/// One notification owed to a user with no connected device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushJob {
    pub user: String,
    /// Decimal message id (JSON-safe).
    pub message_id: String,
    pub channel: String,
    pub sender: String,
    /// The start of the text only: notifications travel through third parties.
    pub summary: String,
}

/// The message a job is about, as the producer knows it.
pub struct MessageRef<'a> {
    pub id: u64,
    pub channel: &'a str,
    pub sender: &'a str,
    pub text: &'a str,
}

impl PushJob {
    /// The job telling `user` about `message`, its text cut to `summary_chars` characters.
    pub fn new(user: &str, message: MessageRef<'_>, summary_chars: usize) -> Self {
        let mut summary: String = message.text.chars().take(summary_chars).collect();
        if message.text.chars().count() > summary_chars {
            summary.push('…');
        }
        Self {
            user: user.to_string(),
            message_id: message.id.to_string(),
            channel: message.channel.to_string(),
            sender: message.sender.to_string(),
            summary,
        }
    }

    /// The [`JOB_FIELD`] value of its stream entry.
    pub fn to_payload(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_payload(payload: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_is_cut_short() {
        let message = || MessageRef { id: 7, channel: "dm:a:b", sender: "a", text: "héllo wörld" };
        assert_eq!(PushJob::new("b", message(), 5).summary, "héllo…");
        assert_eq!(PushJob::new("b", message(), 50).summary, "héllo wörld");
        let job = PushJob::new("b", message(), 5);
        assert_eq!(job.message_id, "7");
        assert_eq!(PushJob::from_payload(&job.to_payload()).expect("round trip"), job);
    }
}
