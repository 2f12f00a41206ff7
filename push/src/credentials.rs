//! Provider credentials.
//!
//! - APNs: a provider token, an ES256 JWT (`kid` = key id, `iss` = team id, `iat`) signed with
//!   the `.p8` key; reused for 30 minutes (Apple rejects tokens older than an hour and
//!   throttles refreshing more often than every 20 minutes).
//! - FCM: an OAuth 2 access token from the service account: an RS256 JWT assertion
//!   (`scope` = firebase.messaging) exchanged at the account's `token_uri`; reused until five
//!   minutes before it expires.
//!
//! Keys are read from their [`SecretSource`] whenever a token is made, so a rotated Secret is
//! used from the next token on.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::config::{ApnsConfig, FcmConfig, SecretSource};
use super::http::{HttpRequest, ProviderError, execute};

pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
const APNS_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// An access token is replaced this long before it expires.
const FCM_TOKEN_MARGIN: Duration = Duration::from_secs(5 * 60);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The first PEM block of `pem`: its label and DER bytes.
pub fn pem_decode(pem: &[u8]) -> Result<(String, Vec<u8>), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the key is not PEM text".to_string())?;
    let mut label = None;
    let mut body = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("-----BEGIN ") {
            label = Some(rest.trim_end_matches('-').to_string());
        } else if line.starts_with("-----END ") {
            break;
        } else if label.is_some() {
            body.push_str(line);
        }
    }
    let label = label.ok_or("no PEM block (-----BEGIN …-----) in the key")?;
    let der = base64::engine::general_purpose::STANDARD.decode(body).map_err(|e| format!("bad PEM base64: {e}"))?;
    Ok((label, der))
}

/// One DER element: (tag, contents, rest).
fn der_element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let err = || "malformed DER".to_string();
    let (&tag, rest) = input.split_first().ok_or_else(err)?;
    let (&first, rest) = rest.split_first().ok_or_else(err)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(err());
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(err());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (what Google's service-account
/// keys are), which is what the JWT library signs with.
pub fn pkcs8_rsa_to_pkcs1(der: &[u8]) -> Result<Vec<u8>, String> {
    const RSA_ENCRYPTION_OID: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let (tag, info, _) = der_element(der)?;
    if tag != 0x30 {
        return Err("not a PKCS#8 key".into());
    }
    let (version_tag, _, rest) = der_element(info)?;
    let (algorithm_tag, algorithm, rest) = der_element(rest)?;
    let (key_tag, key, _) = der_element(rest)?;
    if version_tag != 0x02 || algorithm_tag != 0x30 || key_tag != 0x04 {
        return Err("not a PKCS#8 key".into());
    }
    if !algorithm.starts_with(RSA_ENCRYPTION_OID) {
        return Err("not an RSA key".into());
    }
    Ok(key.to_vec())
}

// ------------------------------------------------------------------- APNs --

#[derive(Serialize, Deserialize)]
struct ApnsClaims {
    iss: String,
    iat: u64,
}

/// An APNs provider token signed with `key_pem` (the `.p8` file: PKCS#8, P-256).
pub fn apns_provider_token(team_id: &str, key_id: &str, key_pem: &[u8], issued_at: u64) -> Result<String, String> {
    let (label, der) = pem_decode(key_pem)?;
    if label != "PRIVATE KEY" {
        return Err(format!("expected a PKCS#8 \"PRIVATE KEY\" (.p8), found {label:?}"));
    }
    let mut header = Header::new(Algorithm::ES256);
    header.typ = None;
    header.kid = Some(key_id.to_string());
    let claims = ApnsClaims { iss: team_id.to_string(), iat: issued_at };
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&der)).map_err(|e| format!("signing: {e}"))
}

/// Makes and caches APNs provider tokens.
pub struct ApnsTokenSigner {
    team_id: String,
    key_id: String,
    key: SecretSource,
    cached: std::sync::Mutex<Option<(String, Instant)>>,
}

impl ApnsTokenSigner {
    pub fn new(config: &ApnsConfig) -> Self {
        Self {
            team_id: config.team_id.clone(),
            key_id: config.key_id.clone(),
            key: config.signing_key.clone(),
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The current provider token, signing a new one when the cached one is 30 minutes old.
    /// A missing or unusable key is a permanent error.
    pub fn token(&self) -> Result<String, ProviderError> {
        let mut cached = self.cached.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((token, made)) = cached.as_ref()
            && made.elapsed() < APNS_TOKEN_LIFETIME
        {
            return Ok(token.clone());
        }
        let key =
            self.key.load().map_err(|e| ProviderError::Permanent(format!("APNs credentials not configured: {e}")))?;
        let token = apns_provider_token(&self.team_id, &self.key_id, &key, now_secs())
            .map_err(|e| ProviderError::Permanent(format!("APNs signing key: {e}")))?;
        *cached = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    /// Drops the cached token (APNs said it expired).
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

// -------------------------------------------------------------------- FCM --

/// The fields of a Google service-account JSON that matter here.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl ServiceAccount {
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(json).map_err(|e| format!("service-account JSON: {e}"))
    }
}

#[derive(Serialize, Deserialize)]
struct AssertionClaims {
    iss: String,
    scope: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// The RS256 JWT assertion exchanged for an access token at `token_url`.
pub fn fcm_assertion(account: &ServiceAccount, token_url: &str, issued_at: u64) -> Result<String, String> {
    let (label, der) = pem_decode(account.private_key.as_bytes())?;
    let pkcs1 = match label.as_str() {
        "PRIVATE KEY" => pkcs8_rsa_to_pkcs1(&der)?,
        "RSA PRIVATE KEY" => der,
        other => return Err(format!("unsupported private key type {other:?}")),
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = account.private_key_id.clone();
    let claims = AssertionClaims {
        iss: account.client_email.clone(),
        scope: FCM_SCOPE.into(),
        aud: token_url.to_string(),
        iat: issued_at,
        exp: issued_at + 3600,
    };
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_rsa_der(&pkcs1)).map_err(|e| format!("signing: {e}"))
}

/// The OAuth 2 JWT-bearer token request.
pub fn fcm_token_request(token_url: &str, assertion: &str) -> HttpRequest {
    // The assertion is base64url and dots: nothing to percent-encode.
    let body = format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}");
    HttpRequest {
        method: reqwest::Method::POST,
        url: token_url.to_string(),
        headers: vec![("Content-Type".into(), "application/x-www-form-urlencoded".into())],
        body: body.into_bytes(),
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Fetches and caches FCM access tokens.
pub struct FcmTokenSource {
    credentials: SecretSource,
    token_url: Option<String>,
    client: reqwest::Client,
    timeout: Duration,
    /// Held while fetching: concurrent sends wait for one fetch instead of each making one.
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl FcmTokenSource {
    pub fn new(config: &FcmConfig, client: reqwest::Client) -> Self {
        Self {
            credentials: config.credentials.clone(),
            token_url: config.token_url.clone(),
            client,
            timeout: config.timeout,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    fn account(&self) -> Result<(ServiceAccount, String), String> {
        let json = self.credentials.load()?;
        let account = ServiceAccount::parse(&json)?;
        let token_url = self
            .token_url
            .clone()
            .or_else(|| account.token_uri.clone())
            .unwrap_or_else(|| GOOGLE_TOKEN_URL.to_string());
        Ok((account, token_url))
    }

    /// Checks that the service account is readable and its key signs.
    pub fn check(&self) -> Result<(), String> {
        let (account, token_url) = self.account()?;
        fcm_assertion(&account, &token_url, now_secs()).map(|_| ())
    }

    pub async fn access_token(&self) -> Result<String, ProviderError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() + FCM_TOKEN_MARGIN < *expires
        {
            return Ok(token.clone());
        }
        let (account, token_url) =
            self.account().map_err(|e| ProviderError::Permanent(format!("FCM credentials not configured: {e}")))?;
        let assertion = fcm_assertion(&account, &token_url, now_secs())
            .map_err(|e| ProviderError::Permanent(format!("FCM service-account key: {e}")))?;
        let response = execute(&self.client, &fcm_token_request(&token_url, &assertion), self.timeout).await?;
        match response.status {
            200..=299 => {}
            429 | 500..=599 => {
                return Err(ProviderError::Transient(format!(
                    "FCM token: HTTP {}: {}",
                    response.status, response.body
                )));
            }
            status => {
                return Err(ProviderError::Permanent(format!(
                    "FCM credentials rejected: HTTP {status}: {}",
                    response.body
                )));
            }
        }
        let parsed: TokenResponse = serde_json::from_str(&response.body)
            .map_err(|e| ProviderError::Transient(format!("FCM token: unreadable response: {e}")))?;
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600).min(24 * 3600));
        *cached = Some((parsed.access_token.clone(), Instant::now() + lifetime));
        Ok(parsed.access_token)
    }

    /// Drops the cached token (FCM answered 401).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    // Throwaway keys generated for these tests only (`openssl genpkey`); they sign nothing real.
    const TEST_EC_KEY: &str = include_str!("testdata/ec-test-key.p8");
    const TEST_EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAETU9gVljUqPFL4zJZQNBsN12RjT1x
ZaJbC6Gk3U1yweOBr4IM6ZsmuwlyRjkjzl5aol2Nl73cXwe9a779XH6uOQ==
-----END PUBLIC KEY-----
";
    pub(crate) const TEST_RSA_KEY: &str = include_str!("testdata/rsa-test-key.pem");
    const TEST_RSA_PUBLIC_PKCS1: &str = include_str!("testdata/rsa-test-key.pub.pkcs1.pem");

    #[test]
    fn the_apns_provider_token_is_an_es256_jwt_of_team_and_key() {
        let token =
            apns_provider_token("TEAM123456", "KEY1234567", TEST_EC_KEY.as_bytes(), 1_767_225_600).expect("sign");
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEY1234567"));
        // The public key's SEC1 point is the last 65 bytes of its SubjectPublicKeyInfo.
        let (_, spki) = pem_decode(TEST_EC_PUBLIC.as_bytes()).expect("pem");
        let key = DecodingKey::from_ec_der(&spki[spki.len() - 65..]);
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let claims = jsonwebtoken::decode::<ApnsClaims>(&token, &key, &validation).expect("verifies").claims;
        assert_eq!(claims.iss, "TEAM123456");
        assert_eq!(claims.iat, 1_767_225_600);
        assert!(apns_provider_token("T", "K", b"not a key", 0).is_err());
        assert!(apns_provider_token("T", "K", TEST_RSA_KEY.as_bytes(), 0).is_err());
    }

    #[test]
    fn a_missing_apns_key_is_a_permanent_error() {
        let config = ApnsConfig::new("T", "K", "com.example", SecretSource::File("/nonexistent/key.p8".into()));
        let error = ApnsTokenSigner::new(&config).token().expect_err("no key");
        assert!(matches!(&error, ProviderError::Permanent(m) if m.contains("credentials not configured")), "{error}");
        let config = ApnsConfig::new("T", "K", "com.example", SecretSource::Value(TEST_EC_KEY.into()));
        let signer = ApnsTokenSigner::new(&config);
        let first = signer.token().expect("token");
        assert_eq!(signer.token().expect("token"), first, "cached");
    }

    #[test]
    fn the_fcm_assertion_is_an_rs256_jwt_for_the_messaging_scope() {
        let account = ServiceAccount {
            client_email: "push@proj.iam.gserviceaccount.com".into(),
            private_key: TEST_RSA_KEY.into(),
            private_key_id: Some("kid-1".into()),
            token_uri: None,
        };
        let assertion = fcm_assertion(&account, GOOGLE_TOKEN_URL, 1_767_225_600).expect("sign");
        let header = jsonwebtoken::decode_header(&assertion).expect("header");
        assert_eq!(header.alg, Algorithm::RS256);
        assert_eq!(header.kid.as_deref(), Some("kid-1"));
        let (_, public) = pem_decode(TEST_RSA_PUBLIC_PKCS1.as_bytes()).expect("pem");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.set_audience(&[GOOGLE_TOKEN_URL]);
        let claims =
            jsonwebtoken::decode::<AssertionClaims>(&assertion, &DecodingKey::from_rsa_der(&public), &validation)
                .expect("verifies")
                .claims;
        assert_eq!(claims.iss, "push@proj.iam.gserviceaccount.com");
        assert_eq!(claims.scope, FCM_SCOPE);
        assert_eq!(claims.exp, claims.iat + 3600);

        let request = fcm_token_request(GOOGLE_TOKEN_URL, &assertion);
        assert_eq!(request.url, GOOGLE_TOKEN_URL);
        assert_eq!(request.header("content-type"), Some("application/x-www-form-urlencoded"));
        let body = String::from_utf8(request.body).expect("utf-8");
        assert_eq!(
            body,
            format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}")
        );
    }

    #[test]
    fn der_parsing_rejects_garbage() {
        assert!(pkcs8_rsa_to_pkcs1(&[]).is_err());
        assert!(pkcs8_rsa_to_pkcs1(&[0x30, 0x05, 0x02]).is_err());
        let (_, ec) = pem_decode(TEST_EC_KEY.as_bytes()).expect("pem");
        assert_eq!(pkcs8_rsa_to_pkcs1(&ec), Err("not an RSA key".to_string()));
        assert!(pem_decode(b"no pem here").is_err());
    }
}
