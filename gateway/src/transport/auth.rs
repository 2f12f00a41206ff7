//! Client authentication: an HS256 JWT naming the user (`sub`) and the
//! device (`dev`), signed with the key the operator keeps in a Secret.
//! Login and signup are a separate service; the gateway only verifies.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::protocol::valid_name;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub dev: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <token>` or `?token=<token>`")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl Authenticator {
    /// `key`: the raw signing key (whitespace around it is ignored, so a key
    /// file with a trailing newline works).
    pub fn new(key: &[u8]) -> Result<Self, AuthError> {
        let key = key.trim_ascii();
        if key.len() < 16 {
            return Err(AuthError::Invalid("the signing key must be at least 16 bytes".into()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self { decoding: DecodingKey::from_secret(key), encoding: EncodingKey::from_secret(key), validation })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                kind => AuthError::Invalid(in_client_terms(kind).into()),
            })?;
        let claims = data.claims;
        if !valid_name(&claims.sub) || !valid_name(&claims.dev) {
            return Err(AuthError::Invalid("sub and dev must be 1-64 of [A-Za-z0-9_.@-]".into()));
        }
        Ok(claims)
    }

    /// Mints a token (development mode and tests only).
    pub fn mint(&self, user: &str, device: &str, ttl_seconds: u64) -> Result<String, AuthError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims { sub: user.into(), dev: device.into(), exp: now + ttl_seconds };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// Why a token was refused, in the terms of docs/protocol.md (the
/// library's own messages name its internals: `unknown variant none`,
/// `InvalidSignature`).
fn in_client_terms(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidSignature => "the signature does not match: not signed with this cluster's signing key",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            "the token must be signed with HS256 (the header's alg)"
        }
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "not a JWT: expected three base64url parts separated by dots"
        }
        ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => {
            "the header or claims are unreadable: need alg HS256 and the claims sub, dev and exp (seconds)"
        }
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        _ => "the token was refused",
    }
}

/// The token of an upgrade request: the `Authorization: Bearer` header, or
/// the `token` query parameter (browsers cannot set headers on WebSockets).
pub fn token_from(headers: &hyper::HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    from_header.or_else(|| query_param(query?, "token"))
}

/// A query parameter's value (percent-decoding is not needed for JWTs and ids).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn minted_tokens_verify() {
        let auth = Authenticator::new(KEY).expect("key");
        let token = auth.mint("alice", "phone", 60).expect("mint");
        let claims = auth.verify(&token).expect("verify");
        assert_eq!((claims.sub.as_str(), claims.dev.as_str()), ("alice", "phone"));
    }

    #[test]
    fn forged_and_expired_tokens_are_refused() {
        let auth = Authenticator::new(KEY).expect("key");
        let other = Authenticator::new(b"another key of enough length!!").expect("key");
        let forged = other.mint("alice", "phone", 60).expect("mint");
        assert!(matches!(auth.verify(&forged), Err(AuthError::Invalid(_))));
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims { sub: "alice".into(), dev: "phone".into(), exp: 1_000 },
            &EncodingKey::from_secret(KEY),
        )
        .expect("encode");
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid(_))));
        let bad_name = auth.mint("a:b", "phone", 60).expect("mint");
        assert!(matches!(auth.verify(&bad_name), Err(AuthError::Invalid(_))));
    }

    /// Refusals say what is wrong in the client's terms, never the
    /// library's internals (`unknown variant none`, `InvalidSignature`).
    #[test]
    fn refusals_say_what_is_wrong_in_the_clients_terms() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let auth = Authenticator::new(KEY).expect("key");
        let other = Authenticator::new(b"another key of enough length!!").expect("key");
        let unsigned =
            format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(r#"{"sub":"a","dev":"b","exp":9999999999}"#));
        let cases = [
            (other.mint("alice", "phone", 60).expect("mint"), "not signed with this cluster's signing key"),
            (unsigned, "alg"),
            ("garbage".to_string(), "not a JWT"),
            (
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &serde_json::json!({"sub": "a", "exp": 9_999_999_999_u64}),
                    &EncodingKey::from_secret(KEY),
                )
                .expect("encode"),
                "claims",
            ),
        ];
        for (token, says) in cases {
            let Err(AuthError::Invalid(why)) = auth.verify(&token) else { panic!("{token} was accepted") };
            assert!(why.contains(says), "{token}: {why:?} should say {says:?}");
            for internal in ["variant", "Invalid", "JSON error", "Base64"] {
                assert!(!why.contains(internal), "{why:?} names the library's internals");
            }
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Authenticator::new(b"short\n").is_err());
    }

    #[test]
    fn tokens_come_from_header_or_query() {
        let mut headers = hyper::HeaderMap::new();
        assert_eq!(token_from(&headers, Some("a=1&token=abc")), Some("abc".into()));
        headers.insert(hyper::header::AUTHORIZATION, "Bearer xyz".parse().expect("header"));
        assert_eq!(token_from(&headers, Some("token=abc")), Some("xyz".into()));
        assert_eq!(token_from(&hyper::HeaderMap::new(), None), None);
    }
}
