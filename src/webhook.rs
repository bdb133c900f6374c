//! Standard Webhooks signatures: verification of on-demand exports, and signing of Ferry's own
//! alert deliveries ([`signed_headers`]), with the same key parsing and the same HMAC.
//!
//! A request is accepted only when `webhook-signature` carries at least one `v1,<base64>` entry
//! equal to HMAC-SHA256(secret, "{webhook-id}.{webhook-timestamp}.{raw body}") and the timestamp is
//! within five minutes of now in either direction. Signatures are decoded to bytes and compared by
//! `hmac`'s constant-time `verify_slice`, which refuses any tag that is not exactly 32 bytes, so an
//! empty (`v1,`) or truncated signature can never match. Only [`verify`] builds a
//! [`VerifiedWebhook`], and the trigger path takes one.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secret::Secret;
use crate::time::Timestamp;

type HmacSha256 = Hmac<Sha256>;

/// How far a timestamp may be from now, either way.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// The shortest webhook key accepted, in bytes (Standard Webhooks suggests 24 to 64).
pub const MIN_SECRET_BYTES: usize = 24;

/// The HMAC key, decoded from `whsec_<base64>`.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

impl WebhookSecret {
    /// Decodes a Standard Webhooks secret: optional `whsec_` prefix, then base64.
    pub fn parse(secret: &Secret) -> Result<Self, WebhookError> {
        let raw = secret.expose().trim();
        let b64 = raw.strip_prefix("whsec_").unwrap_or(raw);
        let key = STANDARD.decode(b64).map_err(|_| WebhookError::BadSecret)?;
        if key.is_empty() {
            return Err(WebhookError::BadSecret);
        }
        if key.len() < MIN_SECRET_BYTES {
            return Err(WebhookError::WeakSecret(key.len()));
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Result<HmacSha256, WebhookError> {
        // HMAC takes keys of any length; the error arm exists only because the trait is generic.
        let mut mac = HmacSha256::new_from_slice(&self.0).map_err(|_| WebhookError::BadSecret)?;
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        Ok(mac)
    }

    /// The `v1,<base64>` signature of a message (for senders and tests).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Result<String, WebhookError> {
        let tag = self.mac(id, &timestamp.to_string(), body)?.finalize().into_bytes();
        Ok(format!("v1,{}", STANDARD.encode(tag)))
    }
}

/// The three Standard Webhooks headers for a message Ferry sends: `webhook-id` (stable across
/// retries of the same message), `webhook-timestamp` (this attempt's time, so the receiver's
/// ±5 minute window holds on a late retry) and `webhook-signature`.
pub fn signed_headers(
    secret: &WebhookSecret,
    id: &str,
    at: Timestamp,
    body: &[u8],
) -> Result<Vec<(String, String)>, WebhookError> {
    let signature = secret.sign(id, at.secs(), body)?;
    Ok(vec![
        ("webhook-id".into(), id.to_string()),
        ("webhook-timestamp".into(), at.secs().to_string()),
        ("webhook-signature".into(), signature),
    ])
}

/// The three Standard Webhooks headers as received (any may be missing).
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookHeaders<'a> {
    /// `webhook-id`
    pub id: Option<&'a str>,
    /// `webhook-timestamp` (Unix seconds)
    pub timestamp: Option<&'a str>,
    /// `webhook-signature` (space-separated `v1,<base64>` entries)
    pub signature: Option<&'a str>,
}

/// Proof that a request was signed with our secret; only [`verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedWebhook {
    id: String,
    timestamp: Timestamp,
}

impl VerifiedWebhook {
    /// The sender's delivery id: the idempotency key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the sender signed it.
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }
}

/// Why a webhook was refused. Every variant maps to 401 except [`WebhookError::BadSecret`] and
/// [`WebhookError::WeakSecret`], which are the operator's configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// A required header is absent or empty.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// The id is too long or contains characters that could confuse the signed string.
    #[error("invalid webhook-id")]
    InvalidId,
    /// The timestamp is not whole Unix seconds.
    #[error("invalid webhook-timestamp")]
    InvalidTimestamp,
    /// The timestamp is more than five minutes old.
    #[error("webhook-timestamp is too old")]
    TooOld,
    /// The timestamp is more than five minutes in the future.
    #[error("webhook-timestamp is too far in the future")]
    TooNew,
    /// No `v1` signature matched.
    #[error("no matching signature")]
    NoMatch,
    /// The configured secret is not valid base64 (a server-side problem).
    #[error("FERRY_WEBHOOK_SECRET is not a valid whsec_<base64> secret")]
    BadSecret,
    /// The configured secret is too short to resist guessing.
    #[error("FERRY_WEBHOOK_SECRET is too weak: {0} bytes, at least 24 are required (echo \"whsec_$(openssl rand -base64 32)\")")]
    WeakSecret(usize),
}

fn present(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|s| !s.is_empty())
}

/// Verifies a webhook over its raw body.
pub fn verify(
    secret: &WebhookSecret,
    headers: WebhookHeaders<'_>,
    body: &[u8],
    now: Timestamp,
) -> Result<VerifiedWebhook, WebhookError> {
    let id = present(headers.id).ok_or(WebhookError::MissingHeader("webhook-id"))?;
    let ts_text = present(headers.timestamp).ok_or(WebhookError::MissingHeader("webhook-timestamp"))?;
    let signatures = present(headers.signature).ok_or(WebhookError::MissingHeader("webhook-signature"))?;
    if id.len() > 256 || id.contains('.') || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WebhookError::InvalidId);
    }
    if ts_text.len() > 12 || !ts_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WebhookError::InvalidTimestamp);
    }
    let ts: i64 = ts_text.parse().map_err(|_| WebhookError::InvalidTimestamp)?;
    let age = now.secs() - ts;
    if age > TOLERANCE_SECS {
        return Err(WebhookError::TooOld);
    }
    if age < -TOLERANCE_SECS {
        return Err(WebhookError::TooNew);
    }
    let mac = secret.mac(id, ts_text, body)?;
    let matched = signatures.split_whitespace().any(|entry| {
        let Some(("v1", b64)) = entry.split_once(',') else { return false };
        match STANDARD.decode(b64) {
            Ok(tag) => mac.clone().verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    });
    if !matched {
        return Err(WebhookError::NoMatch);
    }
    Ok(VerifiedWebhook { id: id.to_string(), timestamp: Timestamp::from_secs(ts) })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks / Svix published test vector.
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret() -> WebhookSecret {
        WebhookSecret::parse(&Secret::new(VECTOR_SECRET)).unwrap()
    }

    fn headers<'a>(sig: &'a str, ts: &'a str) -> WebhookHeaders<'a> {
        WebhookHeaders { id: Some(VECTOR_ID), timestamp: Some(ts), signature: Some(sig) }
    }

    fn now() -> Timestamp {
        Timestamp::from_secs(VECTOR_TS)
    }

    #[test]
    fn published_test_vector_signs_and_verifies() {
        assert_eq!(secret().sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY).unwrap(), VECTOR_SIG);
        let v = verify(&secret(), headers(VECTOR_SIG, "1614265330"), VECTOR_BODY, now()).unwrap();
        assert_eq!(v.id(), VECTOR_ID);
        assert_eq!(v.timestamp(), now());
    }

    #[test]
    fn signed_headers_are_what_verify_accepts_and_match_the_published_vector() {
        let h = signed_headers(&secret(), VECTOR_ID, now(), VECTOR_BODY).unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            (get("webhook-id"), get("webhook-timestamp"), get("webhook-signature")),
            (Some(VECTOR_ID), Some("1614265330"), Some(VECTOR_SIG))
        );
        let received = WebhookHeaders {
            id: get("webhook-id"),
            timestamp: get("webhook-timestamp"),
            signature: get("webhook-signature"),
        };
        assert!(verify(&secret(), received, VECTOR_BODY, now()).is_ok());
        assert_eq!(verify(&secret(), received, b"{}", now()), Err(WebhookError::NoMatch), "bound to the body");
    }

    #[test]
    fn wrong_signature_of_right_length_is_refused() {
        let bad = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
        assert_eq!(verify(&secret(), headers(bad, "1614265330"), VECTOR_BODY, now()), Err(WebhookError::NoMatch));
    }

    #[test]
    fn tampered_body_is_refused() {
        assert_eq!(
            verify(&secret(), headers(VECTOR_SIG, "1614265330"), br#"{"test": 2432232315}"#, now()),
            Err(WebhookError::NoMatch)
        );
    }

    #[test]
    fn empty_and_truncated_signatures_are_refused() {
        let truncated = &VECTOR_SIG[..VECTOR_SIG.len() - 8];
        for sig in [
            "v1,",
            "v1",
            ",",
            truncated,
            "v1,g0hM",
            "v1,!!!notbase64!!!",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert_eq!(
                verify(&secret(), headers(sig, "1614265330"), VECTOR_BODY, now()),
                Err(WebhookError::NoMatch),
                "{sig:?}"
            );
        }
    }

    #[test]
    fn several_signatures_are_accepted_when_one_matches() {
        let sigs = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1a,abc {VECTOR_SIG}");
        assert!(verify(&secret(), headers(&sigs, "1614265330"), VECTOR_BODY, now()).is_ok());
        let none = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1,";
        assert_eq!(verify(&secret(), headers(none, "1614265330"), VECTOR_BODY, now()), Err(WebhookError::NoMatch));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused_at_the_tolerance_edge() {
        let s = secret();
        let sign_at = |ts: i64| s.sign(VECTOR_ID, ts, VECTOR_BODY).unwrap();
        for (offset, expected) in
            [(-TOLERANCE_SECS - 1, Err(WebhookError::TooOld)), (TOLERANCE_SECS + 1, Err(WebhookError::TooNew))]
        {
            let ts = VECTOR_TS + offset;
            let sig = sign_at(ts);
            let got = verify(&s, headers(&sig, &ts.to_string()), VECTOR_BODY, now()).map(|_| ());
            assert_eq!(got, expected, "offset {offset}");
        }
        for offset in [-TOLERANCE_SECS, TOLERANCE_SECS] {
            let ts = VECTOR_TS + offset;
            let sig = sign_at(ts);
            assert!(verify(&s, headers(&sig, &ts.to_string()), VECTOR_BODY, now()).is_ok(), "{offset}");
        }
    }

    #[test]
    fn each_missing_header_is_named() {
        let s = secret();
        let full = headers(VECTOR_SIG, "1614265330");
        let cases = [
            (WebhookHeaders { id: None, ..full }, "webhook-id"),
            (WebhookHeaders { timestamp: Some(" "), ..full }, "webhook-timestamp"),
            (WebhookHeaders { signature: None, ..full }, "webhook-signature"),
        ];
        for (h, name) in cases {
            assert_eq!(verify(&s, h, VECTOR_BODY, now()), Err(WebhookError::MissingHeader(name)));
        }
    }

    #[test]
    fn malformed_timestamp_and_id_are_refused() {
        let s = secret();
        for ts in ["1614265330.5", "-1614265330", "abc", "16142653300000000"] {
            assert_eq!(
                verify(&s, headers(VECTOR_SIG, ts), VECTOR_BODY, now()),
                Err(WebhookError::InvalidTimestamp),
                "{ts}"
            );
        }
        let h =
            WebhookHeaders { id: Some("msg.with.dots"), timestamp: Some("1614265330"), signature: Some(VECTOR_SIG) };
        assert_eq!(verify(&s, h, VECTOR_BODY, now()), Err(WebhookError::InvalidId));
    }

    #[test]
    fn secret_must_be_base64_and_never_prints() {
        assert_eq!(WebhookSecret::parse(&Secret::new("whsec_***")).unwrap_err(), WebhookError::BadSecret);
        assert_eq!(WebhookSecret::parse(&Secret::new("whsec_")).unwrap_err(), WebhookError::BadSecret);
        assert_eq!(WebhookSecret::parse(&Secret::new("whsec_AA==")).unwrap_err(), WebhookError::WeakSecret(1));
        let weak = WebhookSecret::parse(&Secret::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAA")).unwrap_err();
        assert_eq!(weak, WebhookError::WeakSecret(21));
        assert!(weak.to_string().contains("FERRY_WEBHOOK_SECRET") && weak.to_string().contains("24"), "{weak}");
        // The prefix is optional.
        let bare = WebhookSecret::parse(&Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        assert_eq!(bare.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY).unwrap(), VECTOR_SIG);
        assert_eq!(format!("{:?}", secret()), "WebhookSecret([redacted])");
    }
}
