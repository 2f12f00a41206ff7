//! The wire protocol (version 1): JSON text frames, each an object with a
//! `"type"`. Pure: decoding, validation and encoding, no I/O. The reference
//! for client authors is `docs/protocol.md`; tests keep the two in step.
//!
//! - [`frames`]: what clients send ([`ClientFrame`]) and what they receive ([`ServerFrame`]).
//! - [`errors`]: stable error codes.

pub mod errors;
pub mod frames;

pub use crate::names::{MAX_NAME_LEN, valid_name};
pub use errors::{ErrorCode, ProtocolError};
pub use frames::{ClientFrame, Recipient, ServerFrame, WireChannel, WireInboxEntry, WireMessage, WireReceipt};

/// Version spoken on `/v1/ws`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request id echoed back (`req`).
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// Longest idempotency key.
pub const MAX_KEY_LEN: usize = 128;

/// Limits the decoder enforces (from the ChatCluster's `chat` settings).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_message_chars: usize,
    pub max_group_members: usize,
    /// Most entries a `sync` or `history` page holds.
    pub max_page: usize,
    /// Encoded bytes a `sync` or `history` page stops before (`has_more`
    /// then says to go on); a page's first entry always fits, however big.
    pub max_page_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message_chars: 100_000, max_group_members: 100, max_page: 200, max_page_bytes: 512 * 1024 }
    }
}

impl Limits {
    /// Bytes of the largest text frame a client may send: every character
    /// of the longest legal text written in JSON's longest way (an astral
    /// character as two `\uXXXX` escapes: 12 bytes), plus the envelope.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_message_chars.saturating_mul(12).saturating_add(64 * 1024)
    }
}

/// Bytes `s` takes as a JSON string, quotes included, as
/// [`encode`] writes it (control characters escaped, the rest raw UTF-8).
pub fn json_string_len(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

/// The longest prefix of `items` whose encoded sizes add up to at most
/// `budget` bytes, but at least one item; true when items were cut.
pub fn fit_page<T>(items: &mut Vec<T>, budget: usize, size: impl Fn(&T) -> usize) -> bool {
    let mut total = 0;
    let keep = items
        .iter()
        .position(|item| {
            total += size(item);
            total > budget
        })
        .map_or(items.len(), |over| over.max(1));
    let cut = keep < items.len();
    items.truncate(keep);
    cut
}

/// Decodes and validates one text frame. Never panics: every malformed
/// input becomes a [`ProtocolError`] with a stable code and, when the frame
/// named one, its request id so the client can match the error.
pub fn decode(text: &str, limits: &Limits) -> Result<ClientFrame, ProtocolError> {
    // Well-formed frames (nearly all) decode straight into their type; the
    // slower path below only runs to explain what is wrong with the rest.
    // Only objects: serde's tagged enums would also take `["type", "req"]`.
    let is_object = text.trim_start().starts_with('{');
    if let Some(frame) = is_object.then(|| serde_json::from_str::<ClientFrame>(text).ok()).flatten() {
        let req = frame.req().map(|r| r.chars().take(MAX_REQUEST_ID_LEN).collect::<String>());
        return check_req(frame.req())
            .and_then(|()| frame.validate(limits))
            .map(|()| frame)
            .map_err(|e| e.with_req(req));
    }
    explain(text, limits)
}

/// A request id is echoed back as is, so it is bounded.
fn check_req(req: Option<&str>) -> Result<(), ProtocolError> {
    match req {
        Some(req) if req.chars().count() > MAX_REQUEST_ID_LEN => Err(ProtocolError::new(
            ErrorCode::InvalidArgument,
            format!(
                "req must be at most {MAX_REQUEST_ID_LEN} characters (the error echoes its first {MAX_REQUEST_ID_LEN})"
            ),
        )),
        _ => Ok(()),
    }
}

/// The request id of a frame that is not decoded (refused before, e.g. by
/// the rate limit), so the refusal can still name it.
pub fn request_id_of(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct JustReq {
        req: Option<String>,
    }
    let req = serde_json::from_str::<JustReq>(text).ok()?.req?;
    Some(req.chars().take(MAX_REQUEST_ID_LEN).collect())
}

/// Decodes a frame that did not decode directly, into the error saying why.
fn explain(text: &str, limits: &Limits) -> Result<ClientFrame, ProtocolError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::new(ErrorCode::BadFrame, format!("not JSON: {e}")))?;
    let req = value.get("req").and_then(|r| r.as_str()).map(|r| r.chars().take(MAX_REQUEST_ID_LEN).collect::<String>());
    let with_req = |e: ProtocolError| e.with_req(req.clone());
    let Some(kind) = value.get("type").and_then(|t| t.as_str()).map(str::to_owned) else {
        return Err(with_req(ProtocolError::new(
            ErrorCode::BadFrame,
            "a frame is a JSON object with a string \"type\"",
        )));
    };
    if !frames::CLIENT_TYPES.contains(&kind.as_str()) {
        return Err(with_req(ProtocolError::new(ErrorCode::UnknownType, format!("unknown frame type {kind:?}"))));
    }
    let frame: ClientFrame = serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        let code = if message.starts_with("missing field") { ErrorCode::MissingField } else { ErrorCode::BadFrame };
        with_req(ProtocolError::new(code, format!("{kind}: {message}")))
    })?;
    check_req(frame.req()).map_err(&with_req)?;
    frame.validate(limits).map_err(with_req)?;
    Ok(frame)
}

/// An encoded frame shared by every connection (and gateway) it goes to:
/// cloning it copies no bytes, and the WebSocket writer takes it as is.
pub type EncodedFrame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// Encodes a server frame once, for many recipients.
pub fn encode_shared(frame: &ServerFrame) -> EncodedFrame {
    EncodedFrame::from(encode(frame))
}

/// Encodes a server frame as JSON text.
pub fn encode(frame: &ServerFrame) -> String {
    // Serializing plain data structs cannot fail; an empty object keeps the
    // connection alive if it ever did.
    serde_json::to_string(frame).unwrap_or_else(|_| "{}".into())
}

/// The channel of a direct conversation: derived from the sorted pair, so
/// both users name the same channel.
pub fn direct_channel(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    format!("dm:{first}:{second}")
}

/// The two users of a direct channel id.
pub fn direct_members(channel: &str) -> Option<(&str, &str)> {
    let rest = channel.strip_prefix("dm:")?;
    let (a, b) = rest.split_once(':')?;
    (valid_name(a) && valid_name(b)).then_some((a, b))
}

pub fn is_group_channel(channel: &str) -> bool {
    channel.starts_with("g:")
}

#[cfg(test)]
mod tests;
