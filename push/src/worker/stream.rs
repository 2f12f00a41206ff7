//! Reading the job stream: new entries, entries other workers abandoned,
//! and the consumers that are gone.

use std::time::Duration;

use kubechat_redis::Connection;
use redis::Value;

use super::{CONSUMER_REAP_IDLE, Ctx};
use crate::config::PushWorkerConfig;
use crate::job::JOB_FIELD;

/// A stream entry: its id and `job` field (None if missing, or the entry was deleted).
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) job: Option<String>,
}

fn value_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Wall-clock milliseconds, for the dead letters' `failed_at_ms`.
pub(super) fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// `[[id, [field, value, …] | nil], …]`
fn parse_entries(value: &Value) -> Vec<Entry> {
    let Value::Array(items) = value else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else { return None };
            let id = value_string(parts.first()?)?;
            let job = match parts.get(1) {
                Some(Value::Array(fields)) => {
                    { fields.chunks(2).find(|pair| pair.first().and_then(value_string).as_deref() == Some(JOB_FIELD)) }
                        .and_then(|pair| pair.get(1))
                        .and_then(value_string)
                }
                Some(Value::Map(fields)) => fields
                    .iter()
                    .find(|(k, _)| value_string(k).as_deref() == Some(JOB_FIELD))
                    .and_then(|(_, v)| value_string(v)),
                _ => None,
            };
            Some(Entry { id, job })
        })
        .collect()
}

/// XREADGROUP reply: `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3); nil on timeout.
fn parse_read_reply(value: &Value) -> Vec<Entry> {
    match value {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|stream| match stream {
                Value::Array(parts) => parts.get(1).map(parse_entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, entries)| parse_entries(entries)).collect(),
        _ => Vec::new(),
    }
}

pub(super) async fn read_new(
    config: &PushWorkerConfig,
    conn: &mut Connection,
    count: usize,
) -> redis::RedisResult<Vec<Entry>> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&config.consumer_group)
        .arg(&config.consumer_name)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(config.block.as_millis().max(1) as u64)
        .arg("STREAMS")
        .arg(&config.stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(parse_read_reply(&reply))
}

/// XAUTOCLAIM from `cursor`: (next cursor, entries now owned by this worker).
pub(super) async fn autoclaim(
    ctx: &Ctx,
    conn: &mut Connection,
    cursor: &str,
    count: usize,
) -> redis::RedisResult<(String, Vec<Entry>)> {
    let config = &ctx.config;
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(&config.stream)
        .arg(&config.consumer_group)
        .arg(&config.consumer_name)
        .arg(config.claim_idle.as_millis() as u64)
        .arg(cursor)
        .arg("COUNT")
        .arg(count.max(1))
        .query_async(conn)
        .await?;
    let Value::Array(parts) = &reply else { return Ok(("0-0".into(), Vec::new())) };
    let next = parts.first().and_then(value_string).unwrap_or_else(|| "0-0".into());
    let entries = parts.get(1).map(parse_entries).unwrap_or_default();
    if let Some(Value::Array(deleted)) = parts.get(2)
        && !deleted.is_empty()
    {
        // Trimmed from the stream while pending: Redis dropped them from the group.
        tracing::warn!(count = deleted.len(), "push jobs were trimmed from the stream before they were sent");
    }
    Ok((next, entries))
}

/// Removes consumers (other than this one) with nothing pending that have been idle long:
/// workers of pods long gone.
pub(super) async fn reap_consumers(ctx: &Ctx, conn: &mut Connection) -> redis::RedisResult<()> {
    let config = &ctx.config;
    let reply: redis::streams::StreamInfoConsumersReply =
        redis::cmd("XINFO").arg("CONSUMERS").arg(&config.stream).arg(&config.consumer_group).query_async(conn).await?;
    for consumer in reply.consumers {
        let idle = Duration::from_millis(consumer.idle as u64);
        if consumer.pending == 0 && idle > CONSUMER_REAP_IDLE && consumer.name != config.consumer_name {
            let _: Value = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&config.stream)
                .arg(&config.consumer_group)
                .arg(&consumer.name)
                .query_async(conn)
                .await?;
            tracing::info!(consumer = %consumer.name, "removed an idle push consumer");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_replies_parse_with_missing_and_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("kubechat:push"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("job"), bulk("{}")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
                Value::Array(vec![bulk("3-0"), Value::Array(vec![bulk("other"), bulk("x")])]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply);
        assert_eq!(entries.len(), 3);
        assert_eq!((entries[0].id.as_str(), entries[0].job.as_deref()), ("1-0", Some("{}")));
        assert_eq!((entries[1].id.as_str(), entries[1].job.as_deref()), ("2-0", None));
        assert_eq!((entries[2].id.as_str(), entries[2].job.as_deref()), ("3-0", None));
        assert!(parse_read_reply(&Value::Nil).is_empty());
        let resp3 = Value::Map(vec![(
            bulk("kubechat:push"),
            Value::Array(vec![Value::Array(vec![bulk("4-0"), Value::Map(vec![(bulk("job"), bulk("j"))])])]),
        )]);
        let entries = parse_read_reply(&resp3);
        assert_eq!((entries[0].id.as_str(), entries[0].job.as_deref()), ("4-0", Some("j")));
    }
}
