//! Which master serves which slots (`CLUSTER SLOTS`).

use redis::Value;

/// One master and the slot ranges it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// `host:port` as the cluster announces it; empty for a single server
    /// (reach it where the endpoint says).
    pub address: String,
    /// Inclusive ranges.
    pub slots: Vec<(u16, u16)>,
    /// Replicas' `host:port`.
    pub replicas: Vec<String>,
}

impl Shard {
    /// A single server: every slot.
    pub fn whole() -> Self {
        Self { address: String::new(), slots: vec![(0, super::SLOTS - 1)], replicas: Vec::new() }
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|(low, high)| (*low..=*high).contains(&slot))
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

/// `host:port` of a node entry `[host, port, id, …]`.
fn node(value: &Value) -> Option<String> {
    let Value::Array(fields) = value else { return None };
    let host = text(fields.first()?)?;
    let port = int(fields.get(1)?)?;
    Some(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}

/// The reply of `CLUSTER SLOTS`, `[[start, end, master, replica…]…]`, as
/// one [`Shard`] per master, ordered by address.
pub fn parse_cluster_slots(reply: &Value) -> redis::RedisResult<Vec<Shard>> {
    let malformed = || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"));
    let Value::Array(ranges) = reply else { return Err(malformed()) };
    let mut shards: Vec<Shard> = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else { return Err(malformed()) };
        let (Some(start), Some(end), Some(master)) =
            (fields.first().and_then(int), fields.get(1).and_then(int), fields.get(2).and_then(node))
        else {
            return Err(malformed());
        };
        let (start, end) =
            (u16::try_from(start).map_err(|_| malformed())?, u16::try_from(end).map_err(|_| malformed())?);
        let replicas: Vec<String> = fields.iter().skip(3).filter_map(node).collect();
        match shards.iter_mut().find(|s| s.address == master) {
            Some(shard) => {
                shard.slots.push((start, end));
                for replica in replicas {
                    if !shard.replicas.contains(&replica) {
                        shard.replicas.push(replica);
                    }
                }
            }
            None => shards.push(Shard { address: master, slots: vec![(start, end)], replicas }),
        }
    }
    shards.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![bulk(host), Value::Int(port), bulk("id")])
    }

    #[test]
    fn cluster_slots_become_shards() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("127.0.1.2", 6379), node("127.0.1.5", 6379)]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("127.0.1.1", 6379), node("127.0.1.4", 6379)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("127.0.1.1", 6379)]),
        ]);
        let shards = parse_cluster_slots(&reply).expect("parses");
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].address, "127.0.1.1:6379");
        assert_eq!(shards[0].slots, vec![(0, 5460), (10923, 16383)]);
        assert_eq!(shards[0].replicas, vec!["127.0.1.4:6379".to_string()]);
        assert!(shards[0].owns(16383) && !shards[0].owns(6000));
        assert!(shards[1].owns(6000));
        assert!(parse_cluster_slots(&bulk("nonsense")).is_err());
        assert!(Shard::whole().owns(0) && Shard::whole().owns(16383));
    }
}
