//! CQL values and answers: how ids, write timestamps and rows look on the
//! wire, and how a failed request becomes a [`StoreError`].

use std::fmt;

use scylla::deserialize::row::DeserializeRow;
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlValue, Row as CqlRow};

use crate::ids;
use crate::store::{Message, StoreError, StoreResult};

/// A `u64` id or position as a CQL `bigint`, bit for bit. Ids are below 2^63
/// for about 70 years after [`ids::EPOCH_MS`] (41 bits of milliseconds), so
/// they stay positive and keep their order; beyond that they would wrap to
/// negative numbers and sort first.
pub fn to_cql(id: u64) -> i64 {
    id.cast_signed()
}

/// Inverse of [`to_cql`].
pub fn from_cql(value: i64) -> u64 {
    value.cast_unsigned()
}

/// The write timestamp (µs) of every row a send writes for id or position
/// `id`: the time it was minted. A replay of the same rows (a retry, the
/// driver's own retry) writes identical cells with an identical timestamp,
/// so it changes nothing; a later delete keeps winning over a replay.
pub fn write_timestamp(id: u64) -> i64 {
    ids::timestamp_ms(id).saturating_mul(1000)
}

/// The error of a failed request: the backend could not do it now.
pub fn unavailable<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

/// The error of a response whose rows are not what the schema promises.
pub fn corrupt<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

/// CQL `LIMIT` of a `usize` (a limit beyond `i32::MAX` means "all").
pub fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// Decodes all rows of a result into `R`.
pub fn decode<R>(result: QueryResult, what: &'static str) -> StoreResult<Vec<R>>
where
    R: for<'f> DeserializeRow<'f, 'f>,
{
    let rows = result.into_rows_result().map_err(corrupt(what))?;
    let typed = rows.rows::<R>().map_err(corrupt(what))?;
    typed.map(|row| row.map_err(corrupt(what))).collect()
}

/// Checks a keyspace name before it is spliced into DDL text.
pub fn valid_keyspace(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A CQL string literal.
pub fn cql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The answer to an `INSERT … IF NOT EXISTS`: whether it applied and, when
/// it did not, the columns of the row that was there. Read by column name:
/// Cassandra sends only `[applied]` when it applied, ScyllaDB every column.
pub struct Conditional {
    pub applied: bool,
    columns: Vec<(String, Option<CqlValue>)>,
}

impl Conditional {
    pub fn of(result: QueryResult, what: &'static str) -> StoreResult<Self> {
        let rows = result.into_rows_result().map_err(corrupt(what))?;
        let names: Vec<String> = rows.column_specs().iter().map(|spec| spec.name().to_owned()).collect();
        let row: CqlRow = rows.single_row().map_err(corrupt(what))?;
        let columns: Vec<(String, Option<CqlValue>)> = names.into_iter().zip(row.columns).collect();
        let applied = columns
            .iter()
            .find(|(name, _)| name == "[applied]")
            .and_then(|(_, value)| value.as_ref())
            .and_then(CqlValue::as_boolean)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: no [applied] column in the answer")))?;
        Ok(Self { applied, columns })
    }

    /// A column of the existing row (`None` if absent or null).
    pub fn get(&self, name: &str) -> Option<&CqlValue> {
        self.columns.iter().find(|(n, _)| n == name).and_then(|(_, value)| value.as_ref())
    }
}

/// A history row as read: id, sender, device, body, created_at, send key
/// (null in rows written before keys were kept there).
pub type MessageRow = (i64, String, String, String, i64, Option<String>);

/// The columns of [`MessageRow`], for SELECTs.
pub const MESSAGE_COLUMNS: &str = "id, sender, sender_device, body, created_at_ms, send_key";

/// A stored message and the idempotency key it was sent with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedMessage {
    pub message: Message,
    pub send_key: Option<String>,
}

pub fn message_of(
    channel: &str,
    (id, sender, sender_device, text, created_at_ms, send_key): MessageRow,
) -> KeyedMessage {
    let message = Message { id: from_cql(id), channel: channel.to_owned(), sender, sender_device, text, created_at_ms };
    KeyedMessage { message, send_key }
}

/// position, channel, message id, then the copy that only rows written by
/// earlier versions carry: sender, device, body, created_at.
pub type InboxRow = (i64, String, i64, Option<String>, Option<String>, Option<String>, Option<i64>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_bigint() {
        for id in [0, 1, (1 << 63) - 1, 1 << 63, u64::MAX] {
            assert_eq!(from_cql(to_cql(id)), id);
        }
        assert!(to_cql((1 << 63) - 1) > to_cql(1));
    }

    #[test]
    fn keyspace_names_are_checked() {
        assert!(valid_keyspace("kubechat"));
        assert!(valid_keyspace("t_1"));
        assert!(!valid_keyspace(""));
        assert!(!valid_keyspace("1abc"));
        assert!(!valid_keyspace("Kube"));
        assert!(!valid_keyspace("a; DROP"));
        assert!(!valid_keyspace(&"a".repeat(49)));
    }

    #[test]
    fn write_timestamps_follow_the_minting_time() {
        let idgen = ids::IdGenerator::new(1, 0);
        let (a, b) = (idgen.next_id(), idgen.next_id());
        assert_eq!(write_timestamp(a), ids::timestamp_ms(a) * 1000);
        assert!(write_timestamp(b) >= write_timestamp(a));
        let later = ids::first_id_at(ids::timestamp_ms(a) + 2000);
        assert!(write_timestamp(later) > write_timestamp(a), "a position minted later writes later");
    }
}
