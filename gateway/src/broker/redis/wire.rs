//! What the Redis broker keeps in Redis and sends through it: key names,
//! the forward encoding and the server-side scripts.

use super::super::Frame;

/// The hash tag of the keys and channels every gateway shares (leases,
/// the epoch, loads, membership and resync notices): one slot, so that the
/// scripts that touch several of them run on one node of a Redis Cluster.
macro_rules! control {
    ($name:literal) => {
        concat!("kubechat:{control}:", $name)
    };
}

/// Sorted set: gateway id → lease expiry (ms).
pub const GATEWAYS: &str = control!("gateways");
/// When Redis last lost data that live gateways had written (ms; 0 when it
/// never did). Set by the first gateway to notice (its own lease gone, or
/// this key gone). Until every gateway had the time to re-register, a user
/// without sessions may just not be re-registered yet: presence is unknown.
pub const EPOCH: &str = control!("epoch");
/// Hash: gateway id → the [`EPOCH`] its sessions were last registered for
/// (ms). After Redis lost its data, presence is known again once every live
/// gateway's entry has caught up with the epoch: a gateway slow to
/// re-register holds it unknown instead of having its users look offline.
pub const REGISTERED: &str = control!("registered");
/// Hash: gateway id → its [`GatewayLoad`](crate::broker::GatewayLoad) as JSON.
pub const GATEWAY_LOADS: &str = control!("gateway-load");
/// Sharded pub/sub: a group id whose members changed.
pub const GROUPS_CHANGED: &str = control!("groups-changed");
/// Sharded pub/sub: `{gateway}\n{user1,user2,…}` (or `*`): forwards from
/// that gateway to these users may have been lost; their connections should sync.
pub const RESYNC: &str = control!("resync");
/// Prefix of `reaping:{gateway}`: set while a reaper removes that dead
/// gateway's sessions (the gateway, back, waits for it before registering).
pub const REAPING_PREFIX: &str = control!("reaping:");

/// A user's keys carry the user id as their hash tag: sessions, last seen,
/// send keys and push targets of one user share a slot.
pub fn sessions_key(user: &str) -> String {
    format!("kubechat:sessions:{{{user}}}")
}
pub fn seen_key(user: &str) -> String {
    format!("kubechat:seen:{{{user}}}")
}
pub fn gateway_sessions_key(gateway: &str) -> String {
    format!("kubechat:gateway-sessions:{{{gateway}}}")
}
pub fn reaping_key(gateway: &str) -> String {
    format!("{REAPING_PREFIX}{gateway}")
}
/// Partition `tag`'s channel of `gateway`: a gateway listens on one channel
/// per partition, the partitions' tags spread over the slots (and so over a
/// cluster's masters).
pub fn deliver_channel(tag: &str, gateway: &str) -> String {
    format!("kubechat:deliver:{{{tag}}}:{gateway}")
}
pub fn worker_key(worker_id: u16) -> String {
    format!("kubechat:worker-id:{worker_id}")
}

/// How many partitions each gateway's delivery is spread over.
pub const DELIVERY_PARTITIONS: u16 = 16;

/// The delivery partitions' hash tags (the same in every process).
pub fn delivery_partitions() -> kubechat_redis::SlotTags {
    kubechat_redis::SlotTags::new(DELIVERY_PARTITIONS)
}

/// The channel `from` forwards to `to` on: always the same partition for
/// one sender (forwards between two gateways stay in order), any spread
/// over senders will do.
pub fn forward_channel(partitions: &kubechat_redis::SlotTags, from: &str, to: &str) -> String {
    let partition = usize::from(kubechat_redis::slot(from.as_bytes())) % partitions.len();
    deliver_channel(partitions.tag(partition), to)
}

/// The gateway id a session field `{gateway}|{device}` names.
pub fn field_gateway(field: &str) -> Option<&str> {
    field.split_once('|').map(|(gateway, _)| gateway)
}

/// A forward on the wire: the recipients, a newline, the encoded frame.
pub fn encode_forward(users: &[String], frame: &Frame) -> String {
    let mut payload = users.join(",");
    payload.push('\n');
    payload.push_str(frame.as_str());
    payload
}

pub fn decode_forward(payload: String) -> Option<(Vec<String>, Frame)> {
    let (users, frame) = payload.split_once('\n')?;
    let users = users.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect();
    Some((users, Frame::from(frame.to_string())))
}

/// Who must resync after a lost forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncScope {
    Users(Vec<String>),
    /// Too many to list: every connection.
    Everyone,
}

pub fn encode_resync(from: &str, scope: &ResyncScope) -> String {
    match scope {
        ResyncScope::Users(users) => format!("{from}\n{}", users.join(",")),
        ResyncScope::Everyone => format!("{from}\n*"),
    }
}

pub fn decode_resync(payload: &str) -> Option<(&str, ResyncScope)> {
    let (from, users) = payload.split_once('\n')?;
    let scope = if users == "*" {
        ResyncScope::Everyone
    } else {
        ResyncScope::Users(users.split(',').filter(|u| !u.is_empty()).map(str::to_string).collect())
    };
    Some((from, scope))
}

/// Lease renewal, atomic with the loss check: adds or updates the lease.
/// The epoch is missing when Redis lost its data: it becomes now if this
/// gateway wrote a lease before (live gateways' data was lost), 0 on a
/// gateway's first renewal on a fresh Redis. Separately, this gateway's
/// sessions may be gone although Redis kept its data: its entry was missing
/// (reaped after a pause) or had lapsed (a reaper may be removing them).
/// A gateway's first lease (a new process) has nothing to re-register: its
/// [`REGISTERED`] entry is the epoch at once.
/// KEYS: [GATEWAYS, EPOCH, REGISTERED]; ARGV: [gateway id, expiry ms, wrote before (0/1), now ms].
/// Returns {1 if its sessions must be registered again, epoch}.
pub const RENEW_LEASE_SCRIPT: &str = r"
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  if ARGV[3] == '1' then epoch = ARGV[4] else epoch = '0' end
  redis.call('SET', KEYS[2], epoch)
end
local lost = 0
if ARGV[3] == '1' and (not old or tonumber(old) <= tonumber(ARGV[4])) then lost = 1 end
if ARGV[3] == '0' then redis.call('HSET', KEYS[3], ARGV[1], epoch) end
return {lost, tonumber(epoch)}
";

/// The shared state presence and routing read, in one step: the epoch (now,
/// if it was missing: Redis lost its data), the gateways whose lease has
/// not run out, and how many of them have not registered their sessions
/// since that epoch ([`REGISTERED`] behind it; 0 while the epoch is 0).
/// Sessions live in their users' slots and are read after it: a gateway
/// that re-registers in between was counted as not yet registered (presence
/// stays unknown a moment longer), never as registered too early.
/// KEYS: [EPOCH, GATEWAYS, REGISTERED]; ARGV: [now ms].
/// Returns {epoch, live gateways, unregistered count}.
pub const CONTROL_STATE_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')
local unregistered = 0
if tonumber(epoch) > 0 then
  for _, gateway in ipairs(live) do
    local at = redis.call('HGET', KEYS[3], gateway)
    if not at or tonumber(at) < tonumber(epoch) then unregistered = unregistered + 1 end
  end
end
return {tonumber(epoch), live, unregistered}
";

/// A reaper takes a dead gateway: only while its lease has run out, and only
/// one reaper at a time (the marker expires if that reaper dies). Checked
/// and marked in one step with the lease, so a gateway that renews first is
/// never reaped, and one that renews after finds the marker and waits for it
/// to go before registering its sessions again.
/// KEYS: [GATEWAYS, reaping:{gateway}]; ARGV: [gateway, now ms, marker ttl ms].
/// Returns 1 when this caller reaps it.
pub const BEGIN_REAP_SCRIPT: &str = r"
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) > tonumber(ARGV[2]) then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
";

/// The end of a reap with no session left: the gateway's lease and load go
/// (unless it renewed meanwhile), and the marker.
/// KEYS: [GATEWAYS, GATEWAY_LOADS, reaping:{gateway}]; ARGV: [gateway, now ms].
pub const END_REAP_SCRIPT: &str = r"
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[3])
return 1
";

/// Ends a dead gateway's sessions of one user, in the user's slot: its
/// fields go; if no field of a live gateway is left, the user is offline
/// now (last seen: now).
/// KEYS: [sessions:{user}, seen:{user}]; ARGV: [dead gateway, now ms, live gateway…].
/// Returns 1 when the user went offline.
pub const DROP_SESSIONS_SCRIPT: &str = r"
local prefix = ARGV[1] .. '|'
local live = {}
for i = 3, #ARGV do live[ARGV[i]] = true end
local online, dropped = false, false
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[1], field)
    dropped = true
  else
    local other = string.match(field, '^([^|]*)|')
    if other and live[other] then online = true end
  end
end
if dropped and not online then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
";

/// Worker-id claim, compare-and-set. The value is
/// `{gateway}|{instance}|{until ms}`: the process holding the id (a pod
/// name and a number drawn at start, so the old and new process of one
/// pod are two holders) and until when it may mint with it, which it
/// promises never to pass without renewing. The key outlives the claim (a
/// day) so that a successor learns its predecessor's `until`: ids minted
/// from then on cannot collide, whatever its clock says.
/// KEYS: [worker-id key]; ARGV: [gateway, instance, now ms, until ms, keep ms].
/// Returns {1, previous value or ''} when this process holds the claim now,
/// {0, value} while another holder's claim is live. A value of the older
/// format (a bare gateway id, expiring with its lease) is live while it exists.
pub const RENEW_WORKER_SCRIPT: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  local gateway, instance, untl = string.match(held, '^([^|]*)|([^|]*)|(%d+)$')
  if not untl then
    return {0, held}
  end
  local mine = gateway == ARGV[1] and instance == ARGV[2]
  if not mine and tonumber(untl) > tonumber(ARGV[3]) then
    return {0, held}
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[4], 'PX', ARGV[5])
return {1, held or ''}
";

/// A worker-id claim as [`RENEW_WORKER_SCRIPT`] stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerClaim {
    pub gateway: String,
    /// `None` for a claim of the older format (gateway id only).
    pub instance: Option<String>,
    pub until_ms: Option<i64>,
}

impl WorkerClaim {
    pub fn parse(value: &str) -> Self {
        let mut parts = value.splitn(3, '|');
        let gateway = parts.next().unwrap_or_default().to_owned();
        match (parts.next(), parts.next().and_then(|u| u.parse().ok())) {
            (Some(instance), Some(until)) => {
                Self { gateway, instance: Some(instance.to_owned()), until_ms: Some(until) }
            }
            _ => Self { gateway: value.to_owned(), instance: None, until_ms: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_round_trip() {
        let frame = Frame::from_static(r#"{"type":"message","text":"a\nb,c"}"#);
        let payload = encode_forward(&["a".into(), "b".into()], &frame);
        let (users, decoded) = decode_forward(payload).expect("decodes");
        assert_eq!(users, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(decoded.as_str(), frame.as_str(), "the frame travels as is, newlines and commas included");
    }

    #[test]
    fn what_a_script_touches_shares_a_slot() {
        use kubechat_redis::slot;
        let control = slot(GATEWAYS.as_bytes());
        for key in [EPOCH, REGISTERED, GATEWAY_LOADS, GROUPS_CHANGED, RESYNC, reaping_key("gw-0").as_str()] {
            assert_eq!(slot(key.as_bytes()), control, "{key}");
        }
        assert_eq!(slot(sessions_key("alice").as_bytes()), slot(seen_key("alice").as_bytes()));
        assert_eq!(field_gateway("gw-1|phone"), Some("gw-1"));
        assert_eq!(field_gateway("garbage"), None);
    }

    #[test]
    fn worker_claims_parse_both_formats() {
        assert_eq!(
            WorkerClaim::parse("gw-0|9f3a|1767225600000"),
            WorkerClaim { gateway: "gw-0".into(), instance: Some("9f3a".into()), until_ms: Some(1_767_225_600_000) }
        );
        assert_eq!(WorkerClaim::parse("gw-0"), WorkerClaim { gateway: "gw-0".into(), instance: None, until_ms: None });
    }

    #[test]
    fn resync_notices_round_trip() {
        let users = ResyncScope::Users(vec!["a".into(), "b".into()]);
        assert_eq!(decode_resync(&encode_resync("gw-1", &users)), Some(("gw-1", users)));
        assert_eq!(
            decode_resync(&encode_resync("gw-1", &ResyncScope::Everyone)),
            Some(("gw-1", ResyncScope::Everyone))
        );
        assert_eq!(decode_resync("no newline"), None);
    }
}
