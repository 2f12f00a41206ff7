//! Error codes: stable strings clients may switch on. Adding a code is a
//! compatible change; renaming one is not.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, or a field of the wrong type.
    BadFrame,
    UnknownType,
    MissingField,
    /// A field's value is out of range (names, page sizes, ids).
    InvalidArgument,
    /// Text longer than `max_message_chars` characters.
    MessageTooLong,
    EmptyMessage,
    /// The sender may not post to or read this channel.
    NotMember,
    NoSuchGroup,
    /// Adding would exceed `max_group_members`.
    GroupFull,
    /// Only the group's owner may do this.
    Forbidden,
    /// Too many frames: slow down (the connection stays open).
    RateLimited,
    /// Storage is unreachable: nothing was stored or acknowledged; retry with the same key.
    StorageUnavailable,
    /// The store is behind: nothing was stored or acknowledged; retry with
    /// the same key after a short backoff.
    Overloaded,
    /// Something this request needs is unreachable or not part of this
    /// deployment (presence while Redis is down, push registration on a
    /// standalone gateway). The message says which.
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// Every code (a test checks each is documented in docs/protocol.md).
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::InvalidArgument,
        ErrorCode::MessageTooLong,
        ErrorCode::EmptyMessage,
        ErrorCode::NotMember,
        ErrorCode::NoSuchGroup,
        ErrorCode::GroupFull,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::StorageUnavailable,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::MessageTooLong => "message_too_long",
            ErrorCode::EmptyMessage => "empty_message",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NoSuchGroup => "no_such_group",
            ErrorCode::GroupFull => "group_full",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A refused request: becomes an `error` frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub req: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), req: None }
    }

    pub fn with_req(mut self, req: Option<String>) -> Self {
        if self.req.is_none() {
            self.req = req;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_code_once() {
        // Adding a variant breaks this match until ALL (and the docs) include it.
        let index = |code: ErrorCode| match code {
            ErrorCode::BadFrame => 0,
            ErrorCode::UnknownType => 1,
            ErrorCode::MissingField => 2,
            ErrorCode::InvalidArgument => 3,
            ErrorCode::MessageTooLong => 4,
            ErrorCode::EmptyMessage => 5,
            ErrorCode::NotMember => 6,
            ErrorCode::NoSuchGroup => 7,
            ErrorCode::GroupFull => 8,
            ErrorCode::Forbidden => 9,
            ErrorCode::RateLimited => 10,
            ErrorCode::StorageUnavailable => 11,
            ErrorCode::Overloaded => 12,
            ErrorCode::Unavailable => 13,
            ErrorCode::Internal => 14,
        };
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(index(*code), i);
            assert_eq!(serde_json::to_value(code).expect("JSON"), code.as_str());
        }
    }
}
