//! Times in the status and annotations: RFC 3339, whole seconds, UTC.

use k8s_openapi::jiff::Timestamp;

/// `unix_seconds` as RFC 3339.
pub fn rfc3339(unix_seconds: i64) -> String {
    Timestamp::from_second(unix_seconds).unwrap_or(Timestamp::UNIX_EPOCH).to_string()
}

/// Unix seconds of an RFC 3339 time; `None` for anything else.
pub fn parse(text: &str) -> Option<i64> {
    text.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// Now, Unix seconds.
pub fn now() -> i64 {
    Timestamp::now().as_second()
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_round_trip() {
        assert_eq!(super::rfc3339(1_735_689_610), "2025-01-01T00:00:10Z");
        assert_eq!(super::parse("2025-01-01T00:00:10Z"), Some(1_735_689_610));
        assert_eq!(super::parse("yesterday"), None);
    }
}
