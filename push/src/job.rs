//! The job format: what the gateway (producer) appends to the stream and the
//! push workers (consumers) read. Defined here once for both.

use serde::{Deserialize, Serialize};

/// The job streams' base name: jobs go to [`PUSH_PARTITIONS`] streams
/// `kubechat:push:{tag}` ([`partition_streams`]), one consumer group each.
pub const PUSH_STREAM: &str = "kubechat:push";
/// How many streams the jobs are spread over: on a Redis Cluster their tags
/// spread them over the masters (one stream would put every job on one).
pub const PUSH_PARTITIONS: u16 = 8;

/// The streams of `base` in `partitions` partitions: `base` itself for one,
/// `base:{tag}` for more, the tags spread evenly over the slots. Every key a
/// worker keeps about a stream's entries (attempts, sent markers, its
/// dead-letter stream) starts with the stream's name and so shares its slot.
pub fn partition_streams(base: &str, partitions: u16) -> Vec<String> {
    if partitions <= 1 {
        return vec![base.to_string()];
    }
    kubechat_redis::SlotTags::new(partitions).iter().map(|tag| format!("{base}:{{{tag}}}")).collect()
}

/// The partition of `user`'s jobs (a user's jobs stay in order on one stream).
pub fn partition_of(user: &str, partitions: u16) -> usize {
    usize::from(kubechat_redis::slot(user.as_bytes())) % usize::from(partitions.max(1))
}
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
    fn partitions_share_their_tag_with_their_dead_letter_stream() {
        assert_eq!(partition_streams("s", 1), vec!["s".to_string()]);
        let streams = partition_streams(PUSH_STREAM, PUSH_PARTITIONS);
        let dead = partition_streams("kubechat:push:dead", PUSH_PARTITIONS);
        assert_eq!(streams.len(), 8);
        for (stream, dead) in streams.iter().zip(&dead) {
            let slot = kubechat_redis::slot(stream.as_bytes());
            assert_eq!(kubechat_redis::slot(dead.as_bytes()), slot, "{stream} and {dead}");
            assert_eq!(kubechat_redis::slot(format!("{stream}-attempts:1-0").as_bytes()), slot);
        }
        assert!(partition_of("alice", PUSH_PARTITIONS) < 8);
        assert_eq!(partition_of("alice", 1), 0);
    }

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
