//! What a tenant's backend is told and may answer outside the WebSocket contract: its hook settings (the pre-send
//! hook's URL, deadline and failure policy, the signing secret), the pre-send request the hook receives, its verdict,
//! and the Standard Webhooks signature every outbound request carries.
//!
//! A verdict comes from the tenant's server and is as hostile as a client frame: it is checked here before anything
//! acts on it. This module does not send anything and does not decide which addresses may be reached (the
//! gateway's outbound client does).

use crate::{ErrorCode, ProjectId, RoomId, UserId};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

/// Longest hook URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;
/// The pre-send hook's deadline bounds and default, in milliseconds.
pub const PRE_SEND_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 50..=10_000;
pub const PRE_SEND_TIMEOUT_DEFAULT_MS: u32 = 1_000;
/// Largest hook answer read, in bytes; a longer one is a failed call.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest `message` of a `deny`, in characters.
pub const MAX_DENY_MESSAGE_CHARS: usize = 256;
/// Random bytes in a signing secret.
const SECRET_BYTES: usize = 32;
/// The prefix of a signing secret, as the Standard Webhooks libraries expect it.
const SECRET_PREFIX: &str = "whsec_";

/// Why a hook setting or a hook's answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("url: {0}")]
    Url(String),
    #[error("timeout_ms must be {} to {}", PRE_SEND_TIMEOUT_MS.start(), PRE_SEND_TIMEOUT_MS.end())]
    Timeout,
    #[error("signing secret: {0}")]
    Secret(&'static str),
    #[error("the hook's answer: {0}")]
    Answer(String),
}

/// A hook endpoint: an absolute `http` or `https` URL with a host, without credentials, whitespace or control
/// characters. Where it may point is the outbound client's decision, made again at every call.
///
/// Checked by `parse` when a tenant sets it; read back from a stored record as it was stored, so that a rule
/// tightened later never makes a tenant's record unreadable (a stored URL that no longer parses fails its calls).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct HookUrl(String);

impl HookUrl {
    pub fn parse(text: &str) -> Result<HookUrl, HookError> {
        let bad = |why: &str| Err(HookError::Url(why.to_owned()));
        if text.len() > MAX_URL_BYTES {
            return bad(&format!("must be at most {MAX_URL_BYTES} bytes"));
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return bad("must not contain whitespace or control characters");
        }
        let rest = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => rest,
            _ => return bad("must start with http:// or https://"),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return bad("must not carry credentials");
        }
        let host = match authority.strip_prefix('[') {
            Some(bracketed) => match bracketed.split_once(']') {
                Some((v6, port)) if v6.parse::<std::net::Ipv6Addr>().is_ok() && valid_port(port) => v6,
                _ => return bad("has a malformed IPv6 host or port"),
            },
            None => {
                let (host, port) = match authority.rsplit_once(':') {
                    Some((host, port)) => (host, format!(":{port}")),
                    None => (authority, String::new()),
                };
                if !valid_port(&port) {
                    return bad("has a malformed port");
                }
                host
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        // A bracketed IPv6 address was checked above; anything else must be a name or an IPv4 address.
        if !host_ok && !authority.starts_with('[') {
            return bad("needs a host name or an IP address (an IPv6 address in brackets)");
        }
        Ok(HookUrl(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `""` or `":<1..=65535>"`.
fn valid_port(port: &str) -> bool {
    match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            !digits.is_empty() && digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()) && {
                let n: u32 = digits.parse().unwrap_or(0);
                (1..=65_535).contains(&n)
            }
        }
    }
}

impl From<String> for HookUrl {
    fn from(stored: String) -> Self {
        HookUrl(stored)
    }
}

impl From<HookUrl> for String {
    fn from(url: HookUrl) -> String {
        url.0
    }
}

impl std::fmt::Display for HookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What happens to an op when its hook times out, fails or answers nonsense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Fail open: the op goes on unchanged.
    Allow,
    /// Fail closed: the op is refused with `unavailable`.
    Deny,
}

/// A tenant's pre-send hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreSendHook {
    pub url: HookUrl,
    /// The deadline of one call, within `PRE_SEND_TIMEOUT_MS`.
    pub timeout_ms: u32,
    pub on_failure: FailurePolicy,
}

impl PreSendHook {
    pub fn new(url: HookUrl, timeout_ms: Option<u32>, on_failure: FailurePolicy) -> Result<Self, HookError> {
        let timeout_ms = timeout_ms.unwrap_or(PRE_SEND_TIMEOUT_DEFAULT_MS);
        if !PRE_SEND_TIMEOUT_MS.contains(&timeout_ms) {
            return Err(HookError::Timeout);
        }
        Ok(PreSendHook { url, timeout_ms, on_failure })
    }
}

/// The secret a tenant verifies outbound requests with: `whsec_` and the base64 of 32 random bytes. Read back from a
/// stored record as it was stored (see `HookUrl`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct SigningSecret(String);

impl SigningSecret {
    pub fn generate() -> SigningSecret {
        let bytes: [u8; SECRET_BYTES] = rand::random();
        SigningSecret(format!("{SECRET_PREFIX}{}", BASE64.encode(bytes)))
    }

    pub fn parse(text: &str) -> Result<SigningSecret, HookError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(HookError::Secret("must start with whsec_"))?;
        match BASE64.decode(encoded) {
            Ok(key) if (24..=64).contains(&key.len()) => Ok(SigningSecret(text.to_owned())),
            _ => Err(HookError::Secret("must be whsec_ and the base64 of 24 to 64 bytes")),
        }
    }

    /// The secret as the tenant's backend configures its verifier with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn key(&self) -> Vec<u8> {
        self.0.strip_prefix(SECRET_PREFIX).and_then(|encoded| BASE64.decode(encoded).ok()).unwrap_or_default()
    }

    /// The `webhook-signature` header of a request: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`.
    pub fn sign(&self, id: &str, timestamp_secs: u64, body: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key()) else {
            // HMAC takes a key of any length.
            return String::new();
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_secs.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl From<String> for SigningSecret {
    fn from(stored: String) -> Self {
        SigningSecret(stored)
    }
}

impl From<SigningSecret> for String {
    fn from(secret: SigningSecret) -> String {
        secret.0
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// How long a rotated-out signing secret still signs, beside the new one, so a backend can switch its verifier
/// without refusing requests meanwhile.
pub const PREVIOUS_SECRET_GRACE_MS: u64 = 24 * 60 * 60 * 1000;

/// A tenant's hooks, stored in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantHooks {
    pub signing_secret: SigningSecret,
    /// The secret before the last rotation, and until when (unix ms) it still signs.
    #[serde(default)]
    pub previous_secret: Option<(SigningSecret, u64)>,
    #[serde(default)]
    pub pre_send: Option<PreSendHook>,
}

impl TenantHooks {
    pub fn new(signing_secret: SigningSecret) -> Self {
        TenantHooks { signing_secret, previous_secret: None, pre_send: None }
    }

    /// Replace the signing secret; the old one keeps signing for `PREVIOUS_SECRET_GRACE_MS` after `now_ms`.
    pub fn rotate(&mut self, secret: SigningSecret, now_ms: u64) {
        let old = std::mem::replace(&mut self.signing_secret, secret);
        self.previous_secret = Some((old, now_ms.saturating_add(PREVIOUS_SECRET_GRACE_MS)));
    }

    /// The `webhook-signature` header at `now_ms`: the current secret's signature, then the previous secret's while
    /// it is in its grace, separated by a space (a verifier accepts any one of them).
    pub fn signature(&self, id: &str, timestamp_secs: u64, body: &[u8], now_ms: u64) -> String {
        let current = self.signing_secret.sign(id, timestamp_secs, body);
        match &self.previous_secret {
            Some((previous, until_ms)) if now_ms < *until_ms => {
                format!("{current} {}", previous.sign(id, timestamp_secs, body))
            }
            _ => current,
        }
    }
}

/// The op a pre-send hook is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreSendOp {
    Send,
    Dm,
    Edit,
}

/// What the pre-send hook receives (JSON), before the message is sequenced.
#[derive(Debug, Clone, Serialize)]
pub struct PreSendRequest<'a> {
    /// Always `message.pre_send`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub project_id: &'a ProjectId,
    pub op: PreSendOp,
    pub room: &'a RoomId,
    /// The sender (the editor, for `edit`).
    pub user: &'a UserId,
    pub body: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attrs: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// The edited message's seq, for `edit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The pre-send request's `type`.
pub const PRE_SEND_TYPE: &str = "message.pre_send";

/// A pre-send hook's answer, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    /// The client gets this `err`.
    Deny {
        code: ErrorCode,
        message: String,
    },
    /// The message is sequenced with this body instead; `attrs`: `None` keeps the sender's, `Some(None)` removes
    /// them, `Some(Some(..))` replaces them (an `edit` takes no attrs).
    Modify {
        body: String,
        attrs: Option<Option<Value>>,
    },
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
enum RawVerdict {
    Allow {},
    Deny {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
    Modify {
        body: String,
        /// Absent: keep; `null`: remove.
        #[serde(default, deserialize_with = "present")]
        attrs: Option<Option<Value>>,
    },
}

/// A field that is present, `null` included (absent fields take the default, `None`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Option<Value>>, D::Error> {
    Option::<Value>::deserialize(deserializer).map(Some)
}

/// Codes a `deny` may carry; `forbidden` when it names none. (`rate_limited` is not among them: the contract gives it
/// a `retry_after_ms` that a hook does not know.)
const DENY_CODES: [ErrorCode; 3] = [ErrorCode::Forbidden, ErrorCode::BadRequest, ErrorCode::TooLarge];

impl Verdict {
    /// Check a hook's answer: a modified body and attrs within the same limits as a client's, a deny code from the
    /// few that mean "refused" and a short printable message.
    pub fn parse(
        answer: &[u8],
        op: PreSendOp,
        max_body_bytes: usize,
        max_attrs_bytes: usize,
    ) -> Result<Self, HookError> {
        let bad = |why: String| Err(HookError::Answer(why));
        if answer.len() > MAX_ANSWER_BYTES {
            return bad(format!("longer than {MAX_ANSWER_BYTES} bytes"));
        }
        let raw: RawVerdict = match serde_json::from_slice(answer) {
            Ok(raw) => raw,
            Err(error) => return bad(format!("not a verdict ({error})")),
        };
        match raw {
            RawVerdict::Allow {} => Ok(Verdict::Allow),
            RawVerdict::Deny { code, message } => {
                let code = match code.as_deref() {
                    None => ErrorCode::Forbidden,
                    Some(name) => match DENY_CODES.iter().find(|c| c.as_str() == name) {
                        Some(code) => *code,
                        None => return bad(format!("a deny code must be one of {}", deny_code_names())),
                    },
                };
                let message = message.unwrap_or_else(|| "refused by the application".to_owned());
                if message.chars().count() > MAX_DENY_MESSAGE_CHARS || message.chars().any(is_invisible) {
                    return bad(format!(
                        "a deny message must be at most {MAX_DENY_MESSAGE_CHARS} characters without control characters"
                    ));
                }
                Ok(Verdict::Deny { code, message })
            }
            RawVerdict::Modify { body, attrs } => {
                if body.len() > max_body_bytes {
                    return bad(format!("the modified body exceeds {max_body_bytes} bytes"));
                }
                if attrs.is_some() && op == PreSendOp::Edit {
                    return bad("an edit takes no attrs".to_owned());
                }
                if let Some(Some(attrs)) = &attrs {
                    if op == PreSendOp::Edit {
                        return bad("an edit takes no attrs".to_owned());
                    }
                    if !attrs.is_object() {
                        return bad("the modified attrs must be a JSON object".to_owned());
                    }
                    let size = serde_json::to_vec(attrs).map(|v| v.len()).unwrap_or(usize::MAX);
                    if size > max_attrs_bytes {
                        return bad(format!("the modified attrs exceed {max_attrs_bytes} bytes of JSON"));
                    }
                }
                Ok(Verdict::Modify { body, attrs })
            }
        }
    }
}

/// Control characters, and the format characters that reorder or hide text (bidi overrides and isolates, zero-width
/// marks, the byte-order mark).
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

fn deny_code_names() -> String {
    DENY_CODES.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_absolute_http_without_credentials_or_controls() {
        for good in [
            "http://127.0.0.1:8080/hook",
            "https://hooks.example.com/a?b=c",
            "http://[::1]:9/x",
            "HTTPS://Example.COM",
            "http://localhost",
        ] {
            assert!(HookUrl::parse(good).is_ok(), "{good}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        for bad in [
            "ftp://example.com",
            "example.com/hook",
            "http://user:pw@example.com/",
            "http://exa mple.com/",
            "http://example.com/\r\nHost: evil",
            "http://example.com/\0",
            "http://:80/",
            "http://example.com:0/",
            "http://example.com:99999/",
            "http://example.com:8x/",
            "http://[::1/",
            "http://ex_ample.com/",
            "http://-example.com/",
            "http://exämple.com/",
            "http://::1:80/",
            long.as_str(),
        ] {
            assert!(HookUrl::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_signature_matches_the_standard_webhooks_test_vector() {
        // The example of the Standard Webhooks specification.
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signature = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_generated_distinct_and_checked() {
        let (a, b) = (SigningSecret::generate(), SigningSecret::generate());
        assert_ne!(a, b);
        assert!(SigningSecret::parse(a.expose()).is_ok());
        assert!(!format!("{a:?}").contains(&a.expose()[6..]));
        for bad in ["", "whsec_", "whsec_!!!!", "abc_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_YWJj"] {
            assert!(SigningSecret::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verdicts_are_checked_like_client_input() {
        let parse = |text: &str, op| Verdict::parse(text.as_bytes(), op, 10, 20);
        assert_eq!(parse(r#"{"action":"allow"}"#, PreSendOp::Send), Ok(Verdict::Allow));
        assert_eq!(
            parse(r#"{"action":"deny"}"#, PreSendOp::Send),
            Ok(Verdict::Deny { code: ErrorCode::Forbidden, message: "refused by the application".into() })
        );
        assert_eq!(
            parse(r#"{"action":"deny","code":"bad_request","message":"rephrase"}"#, PreSendOp::Dm),
            Ok(Verdict::Deny { code: ErrorCode::BadRequest, message: "rephrase".into() })
        );
        assert_eq!(
            parse(r#"{"action":"modify","body":"ok","attrs":{"a":1}}"#, PreSendOp::Send),
            Ok(Verdict::Modify { body: "ok".into(), attrs: Some(Some(serde_json::json!({"a": 1}))) })
        );
        assert_eq!(
            parse(r#"{"action":"modify","body":"ok","attrs":null}"#, PreSendOp::Send),
            Ok(Verdict::Modify { body: "ok".into(), attrs: Some(None) })
        );
        assert_eq!(
            parse(r#"{"action":"modify","body":"ok"}"#, PreSendOp::Send),
            Ok(Verdict::Modify { body: "ok".into(), attrs: None })
        );
        for bad in [
            "",
            "null",
            "{}",
            r#"{"action":"maybe"}"#,
            r#"{"action":"allow","extra":1}"#,
            r#"{"action":"deny","code":"internal"}"#,
            r#"{"action":"deny","code":"unauthorized"}"#,
            r#"{"action":"deny","code":"rate_limited"}"#,
            r#"{"action":"deny","message":"a\u202eb"}"#,
            "{\"action\":\"deny\",\"message\":\"a\\r\\nb\"}",
            r#"{"action":"modify","body":"much too long"}"#,
            r#"{"action":"modify","body":"x","attrs":[1]}"#,
            r#"{"action":"modify","body":"x","attrs":{"long":"aaaaaaaaaaaaaaaaaaaaa"}}"#,
        ] {
            assert!(parse(bad, PreSendOp::Send).is_err(), "{bad}");
        }
        let long_message = format!(r#"{{"action":"deny","message":"{}"}}"#, "m".repeat(MAX_DENY_MESSAGE_CHARS + 1));
        assert!(parse(&long_message, PreSendOp::Send).is_err());
        assert!(parse(r#"{"action":"modify","body":"x","attrs":{}}"#, PreSendOp::Edit).is_err());
        assert!(parse(r#"{"action":"modify","body":"x","attrs":null}"#, PreSendOp::Edit).is_err());
        assert!(parse(r#"{"action":"modify","body":"x"}"#, PreSendOp::Edit).is_ok());
        assert!(Verdict::parse(&vec![b' '; MAX_ANSWER_BYTES + 1], PreSendOp::Send, 10, 10).is_err());
    }

    #[test]
    fn a_rotated_secret_signs_beside_the_new_one_for_its_grace_only() {
        let mut hooks = TenantHooks::new(SigningSecret::generate());
        let old = hooks.signing_secret.clone();
        assert_eq!(hooks.signature("msg_1", 7, b"{}", 0), old.sign("msg_1", 7, b"{}"));
        let new = SigningSecret::generate();
        hooks.rotate(new.clone(), 1_000);
        let both = hooks.signature("msg_1", 7, b"{}", 1_000 + PREVIOUS_SECRET_GRACE_MS - 1);
        assert_eq!(both, format!("{} {}", new.sign("msg_1", 7, b"{}"), old.sign("msg_1", 7, b"{}")));
        let after = hooks.signature("msg_1", 7, b"{}", 1_000 + PREVIOUS_SECRET_GRACE_MS);
        assert_eq!(after, new.sign("msg_1", 7, b"{}"));
    }

    #[test]
    fn a_hook_deadline_is_bounded() {
        let url = HookUrl::parse("https://example.com/").unwrap();
        assert_eq!(PreSendHook::new(url.clone(), None, FailurePolicy::Allow).unwrap().timeout_ms, 1000);
        assert!(PreSendHook::new(url.clone(), Some(0), FailurePolicy::Deny).is_err());
        assert!(PreSendHook::new(url, Some(10_001), FailurePolicy::Deny).is_err());
    }

    #[test]
    fn hook_settings_survive_the_record_codec_and_stored_values_stay_readable() {
        let hooks = TenantHooks {
            signing_secret: SigningSecret::generate(),
            previous_secret: None,
            pre_send: Some(
                PreSendHook::new(HookUrl::parse("https://example.com/").unwrap(), Some(300), FailurePolicy::Deny)
                    .unwrap(),
            ),
        };
        let bytes = crate::codec::encode(&hooks).unwrap();
        assert_eq!(crate::codec::decode::<TenantHooks>(&bytes).unwrap(), hooks);
        // Stored values are read as they were stored, even ones the API would refuse today.
        let json = serde_json::json!({"signing_secret": "nope", "pre_send": {"url": "ftp://x", "timeout_ms": 1, "on_failure": "deny"}});
        let lenient = serde_json::from_value::<TenantHooks>(json).unwrap();
        assert_eq!(lenient.signing_secret.sign("a", 1, b""), SigningSecret("nope".into()).sign("a", 1, b""));
        // A record written before secrets were rotated reads as having no previous one.
        let json = serde_json::json!({"signing_secret": hooks.signing_secret.expose(), "pre_send": null});
        assert_eq!(serde_json::from_value::<TenantHooks>(json).unwrap().previous_secret, None);
        let json = serde_json::json!({"signing_secret": hooks.signing_secret.expose(), "previous_secret": ["bad", 1]});
        assert!(serde_json::from_value::<TenantHooks>(json).is_ok());
    }
}
