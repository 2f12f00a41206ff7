//! What the Redis broker keeps in Redis and sends through it: key names,
//! the forward encoding and the server-side scripts.

use super::super::Frame;

pub const GATEWAYS: &str = "kubechat:gateways";
/// When Redis last lost data that live gateways had written (ms; 0 when it
/// never did). Set by the first gateway to notice (its own lease gone, or
/// this key gone). Until every gateway had the time to re-register, a user
/// without sessions may just not be re-registered yet: presence is unknown.
pub const EPOCH: &str = "kubechat:epoch";
/// Hash: gateway id → the [`EPOCH`] its sessions were last registered for
/// (ms). After Redis lost its data, presence is known again once every live
/// gateway's entry has caught up with the epoch: a gateway slow to
/// re-register holds it unknown instead of having its users look offline.
pub const REGISTERED: &str = "kubechat:registered";
/// Hash: gateway id → its [`GatewayLoad`](crate::broker::GatewayLoad) as JSON.
pub const GATEWAY_LOADS: &str = "kubechat:gateway-load";
pub const GROUPS_CHANGED: &str = "kubechat:groups-changed";
/// Pub/sub: `{gateway}\n{user1,user2,…}` (or `*`): forwards from that gateway
/// to these users may have been lost; their connections should sync.
pub const RESYNC: &str = "kubechat:resync";

pub fn sessions_key(user: &str) -> String {
    format!("{SESSIONS_PREFIX}{user}")
}
pub fn gateway_sessions_key(gateway: &str) -> String {
    format!("kubechat:gateway-sessions:{gateway}")
}
pub fn seen_key(user: &str) -> String {
    format!("{SEEN_PREFIX}{user}")
}
pub fn deliver_channel(gateway: &str) -> String {
    format!("{DELIVER_PREFIX}{gateway}")
}
pub fn worker_key(worker_id: u16) -> String {
    format!("kubechat:worker-id:{worker_id}")
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

/// Presence lookup, atomic: for each user, the gateways holding a session
/// whose lease has not run out; the epoch (now, if it was missing: Redis
/// lost its data); and how many live gateways have not registered their
/// sessions since that epoch ([`REGISTERED`] behind it; 0 while the epoch
/// is 0, Redis never lost data).
/// KEYS: [EPOCH, GATEWAYS, REGISTERED, sessions:{user}…]; ARGV: [now ms].
/// Reading sessions, leases and registrations in one step leaves no window
/// in which a gateway that just re-registered looks dead from a stale cache,
/// or registered with its sessions not yet read.
pub const LIVE_SESSIONS_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
end
local unregistered = 0
if tonumber(epoch) > 0 then
  for _, gateway in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
    local at = redis.call('HGET', KEYS[3], gateway)
    if not at or tonumber(at) < tonumber(epoch) then unregistered = unregistered + 1 end
  end
end
local users = {}
for i = 4, #KEYS do
  local live = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[i])) do
    local gateway = string.match(field, '^([^|]*)|')
    if gateway then
      local expiry = redis.call('ZSCORE', KEYS[2], gateway)
      if expiry and tonumber(expiry) > now then
        live[#live + 1] = gateway
      end
    end
  end
  users[#users + 1] = live
end
return {tonumber(epoch), users, unregistered}
";

/// Routing a frame in one round trip: for each user, the gateways holding
/// a live session (lease not run out), read atomically with the leases as
/// in [`LIVE_SESSIONS_SCRIPT`]; then one `PUBLISH` per other gateway with
/// every recipient there (`users\n{frame}`, as [`encode_forward`]).
/// KEYS: [EPOCH, GATEWAYS, sessions:{user}…]; ARGV: [now ms, this gateway,
/// frame, deliver channel prefix, user…] (users in the order of their keys).
/// Returns {epoch, indices (1-based) of users with no live session,
/// indices of users on gateways nobody was subscribed for}.
pub const ROUTE_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
end
local offline, by_gateway, order = {}, {}, {}
for i = 3, #KEYS do
  local user, live, seen = i - 2, false, {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[i])) do
    local gateway = string.match(field, '^([^|]*)|')
    if gateway and not seen[gateway] then
      seen[gateway] = true
      local expiry = redis.call('ZSCORE', KEYS[2], gateway)
      if expiry and tonumber(expiry) > now then
        live = true
        if gateway ~= ARGV[2] then
          if not by_gateway[gateway] then
            by_gateway[gateway] = {}
            order[#order + 1] = gateway
          end
          table.insert(by_gateway[gateway], user)
        end
      end
    end
  end
  if not live then offline[#offline + 1] = user end
end
local unheard = {}
for _, gateway in ipairs(order) do
  local names = {}
  for _, user in ipairs(by_gateway[gateway]) do names[#names + 1] = ARGV[4 + user] end
  local receivers = redis.call('PUBLISH', ARGV[4] .. gateway, table.concat(names, ',') .. '\n' .. ARGV[3])
  if receivers == 0 then
    for _, user in ipairs(by_gateway[gateway]) do unheard[#unheard + 1] = user end
  end
end
return {tonumber(epoch), offline, unheard}
";

/// The sessions registered under a gateway id, read in one step:
/// `(user, device)` pairs (flattened).
/// KEYS: [gateway-sessions:{gateway}]; ARGV: [gateway, sessions key prefix].
pub const GATEWAY_SESSIONS_SCRIPT: &str = r"
local prefix = ARGV[1] .. '|'
local out = {}
for _, user in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for _, field in ipairs(redis.call('HKEYS', ARGV[2] .. user)) do
    if string.sub(field, 1, #prefix) == prefix then
      out[#out + 1] = user
      out[#out + 1] = string.sub(field, #prefix + 1)
    end
  end
end
return out
";

/// Reaps up to ARGV[5] users of a dead gateway in one atomic step, and the
/// gateway itself once none is left. Nothing happens if the gateway renewed
/// its lease meanwhile (it came back): the check and the removal are one
/// step. Chunks keep one call short however many users a gateway had.
/// KEYS: [GATEWAYS, GATEWAY_LOADS, gateway-sessions:{gateway}];
/// ARGV: [gateway, now ms, sessions key prefix, seen key prefix, chunk].
/// Returns {done (0/1), users now offline everywhere…}.
pub const REAP_SCRIPT: &str = r"
local gateway, now = ARGV[1], tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[1], gateway)
if not expiry or tonumber(expiry) > now then return {1} end
local prefix = gateway .. '|'
local out = {0}
for _, user in ipairs(redis.call('SPOP', KEYS[3], tonumber(ARGV[5]))) do
  local key = ARGV[3] .. user
  local live = false
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if string.sub(field, 1, #prefix) == prefix then
      redis.call('HDEL', key, field)
    else
      local other = string.match(field, '^([^|]*)|')
      local lease = other and redis.call('ZSCORE', KEYS[1], other)
      if lease and tonumber(lease) > now then live = true end
    end
  end
  if not live then
    redis.call('SET', ARGV[4] .. user, ARGV[2])
    out[#out + 1] = user
  end
end
if redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('HDEL', KEYS[2], gateway)
  redis.call('ZREM', KEYS[1], gateway)
  out[1] = 1
end
return out
";

/// Key prefixes the scripts build keys from.
pub const SESSIONS_PREFIX: &str = "kubechat:sessions:";
pub const SEEN_PREFIX: &str = "kubechat:seen:";

/// The prefix of [`deliver_channel`], for [`ROUTE_SCRIPT`].
pub const DELIVER_PREFIX: &str = "kubechat:deliver:";

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
