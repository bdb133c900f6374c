//! Requests and responses as plain values.
//!
//! The core describes the HTTP exchanges it wants; the runtime performs them with `Fetch` and
//! hands the answers back. Header values that carry credentials are redacted from `Debug`.

use std::fmt;
use std::time::Duration;

use chrono::DateTime;

use crate::error::StepError;
use crate::time::Timestamp;

/// HTTP methods the providers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// DELETE
    Delete,
    /// PUT (a D1 import's upload)
    Put,
    /// HEAD (a download's headers without its body)
    Head,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Delete => "DELETE",
            Self::Put => "PUT",
            Self::Head => "HEAD",
        }
    }
}

/// A request the runtime should send.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method.
    pub method: Method,
    /// Absolute URL.
    pub url: String,
    /// Header name/value pairs.
    pub headers: Vec<(String, String)>,
    /// Body, if any.
    pub body: Option<Vec<u8>>,
}

/// Headers whose values are credentials and must never be printed.
const SENSITIVE: [&str; 7] = [
    "authorization",
    "x-auth-key",
    "x-auth-token",
    "dg-auth",
    "x-dgraph-accesstoken",
    "dxpcloud-authorization",
    "cookie",
];

impl HttpRequest {
    /// A GET with no headers.
    pub fn get(url: impl Into<String>) -> Self {
        Self { method: Method::Get, url: url.into(), headers: Vec::new(), body: None }
    }

    /// A HEAD with no headers.
    pub fn head(url: impl Into<String>) -> Self {
        Self { method: Method::Head, url: url.into(), headers: Vec::new(), body: None }
    }

    /// A DELETE with no headers.
    pub fn delete(url: impl Into<String>) -> Self {
        Self { method: Method::Delete, url: url.into(), headers: Vec::new(), body: None }
    }

    /// A PUT with no headers (its body is sent by the runtime).
    pub fn put(url: impl Into<String>) -> Self {
        Self { method: Method::Put, url: url.into(), headers: Vec::new(), body: None }
    }

    /// A POST of a JSON value.
    pub fn post_json(url: impl Into<String>, body: &serde_json::Value) -> Self {
        Self {
            method: Method::Post,
            url: url.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Some(body.to_string().into_bytes()),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The value of a header (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let shown = if SENSITIVE.contains(&k.to_ascii_lowercase().as_str()) { "[redacted]" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .field("body_len", &self.body.as_ref().map(Vec::len))
            .finish()
    }
}

/// A response the runtime received (body fully read; only used for small API answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header name/value pairs (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A response with a JSON body (tests and emulation).
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text, cut to `max` characters, for error messages.
    pub fn snippet(&self, max: usize) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let trimmed = text.trim();
        match trimmed.char_indices().nth(max) {
            Some((i, _)) => format!("{}…", &trimmed[..i]),
            None => trimmed.to_string(),
        }
    }

    /// The `Retry-After` delay relative to `now`: delta-seconds or an HTTP-date.
    pub fn retry_after(&self, now: Timestamp) -> Option<Duration> {
        parse_retry_after(self.header("retry-after")?, now)
    }
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (relative to `now`).
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = DateTime::parse_from_rfc2822(value).ok()?;
    let when = Timestamp::from_millis(when.timestamp_millis());
    Some(when.since(now))
}

/// How many redirects one request follows before it fails.
pub const MAX_REDIRECTS: usize = 5;

/// Whether a status is a redirect Ferry follows (with a `Location`).
pub fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// The scheme, host and port of a URL: credentials are sent only within one origin.
fn origin(url: &url::Url) -> (String, Option<String>, Option<u16>) {
    (url.scheme().to_string(), url.host_str().map(str::to_string), url.port_or_known_default())
}

/// `scheme://host:port` of a URL, without its path or query (which may be signed).
fn origin_text(url: &url::Url) -> String {
    match url.port_or_known_default() {
        Some(port) => format!("{}://{}:{port}", url.scheme(), url.host_str().unwrap_or("?")),
        None => format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?")),
    }
}

/// The request to send after `current` (which descends from `original`) was answered with the
/// redirect `status` and `location`. Redirects are followed by Ferry, not by `fetch`, so that the
/// provider's credentials go only to the provider's own origin: a hop to another origin drops
/// every credential header (and they stay dropped, as in the Fetch standard). `303`, and `301`/
/// `302` after a POST, continue as a GET without a body. A hop that would re-send a body to
/// another origin (a `307`/`308`, or a `301`/`302` of a PUT) is refused, naming both origins: a
/// body may hold credentials (Dgraph's logins carry the password). The error says why a redirect
/// cannot be followed, without echoing a signed query string.
pub fn redirected(
    original: &HttpRequest,
    current: &HttpRequest,
    status: u16,
    location: Option<&str>,
) -> Result<HttpRequest, String> {
    let from = url::Url::parse(&current.url).map_err(|e| format!("the redirected URL is invalid ({e})"))?;
    let location = location
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{} answered HTTP {status} without a Location", from.host_str().unwrap_or("?")))?;
    let to = from
        .join(location)
        .map_err(|e| format!("{} redirected to an invalid URL ({e})", from.host_str().unwrap_or("?")))?;
    if !matches!(to.scheme(), "http" | "https") || to.host_str().is_none() {
        return Err(format!(
            "{} redirected to a {}: URL, which Ferry does not follow",
            from.host_str().unwrap_or("?"),
            to.scheme()
        ));
    }
    let same_origin = url::Url::parse(&original.url).is_ok_and(|o| origin(&o) == origin(&to));
    let as_get = status == 303 || (matches!(status, 301 | 302) && current.method == Method::Post);
    if !same_origin && !as_get && current.body.is_some() {
        // A 307/308 (or a 301/302 of a PUT) re-sends the body (RFC 9110 §15.4.8, §15.4.9), and
        // Ferry's bodies can hold credentials (Dgraph's logins carry the password): none goes to
        // another origin, whatever it holds.
        return Err(format!(
            "{} answered HTTP {status} redirecting a {} with a body to another origin, {}; Ferry does not \
             re-send a request body (it may hold credentials) to another origin",
            origin_text(&from),
            current.method.as_str(),
            origin_text(&to)
        ));
    }
    let headers = current
        .headers
        .iter()
        .filter(|(k, _)| same_origin || !SENSITIVE.contains(&k.as_str()))
        .filter(|(k, _)| !(as_get && k == "content-type"))
        .cloned()
        .collect();
    Ok(HttpRequest {
        method: if as_get { Method::Get } else { current.method },
        url: to.to_string(),
        headers,
        body: if as_get { None } else { current.body.clone() },
    })
}

/// The class of a non-success status: 429, 408 and 5xx are transient, other 4xx permanent.
pub fn status_error(resp: &HttpResponse, now: Timestamp, message: String) -> StepError {
    match resp.status {
        429 | 408 | 500..=599 => StepError::Transient { message, retry_after: resp.retry_after(now) },
        _ => StepError::Permanent { message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_credentials() {
        let r = HttpRequest::get("https://x").header("Authorization", "Bearer s3cr3t").header("Accept", "text/plain");
        let shown = format!("{r:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("[redacted]") && shown.contains("text/plain"), "{shown}");
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = Timestamp::parse_rfc3339("2015-10-21T07:27:00Z").unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let now = Timestamp::from_secs(0);
        let r = |s| HttpResponse { status: s, headers: vec![], body: vec![] };
        for s in [429, 408, 500, 502, 503, 504] {
            assert!(status_error(&r(s), now, String::new()).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            assert!(!status_error(&r(s), now, String::new()).is_retryable(), "{s}");
        }
        let limited = r(429).with_header("Retry-After", "3");
        assert_eq!(
            status_error(&limited, now, "x".into()),
            StepError::Transient { message: "x".into(), retry_after: Some(Duration::from_secs(3)) }
        );
    }

    fn authed() -> HttpRequest {
        HttpRequest::get("https://api.example.com/backup/download/db?x=1")
            .header("dxpcloud-authorization", "Bearer user-token")
            .header("authorization", "Basic abc")
            .header("range", "bytes=10-")
    }

    #[test]
    fn a_redirect_within_the_origin_keeps_credentials_and_resolves_relative_locations() {
        let r = authed();
        let next = redirected(&r, &r, 302, Some("/files/db.gz")).unwrap();
        assert_eq!(next.url, "https://api.example.com/files/db.gz");
        assert_eq!(next.header_value("dxpcloud-authorization"), Some("Bearer user-token"));
        assert_eq!(next.header_value("range"), Some("bytes=10-"));
    }

    #[test]
    fn a_redirect_to_another_origin_drops_every_credential_and_they_stay_dropped() {
        let r = authed();
        let away = redirected(&r, &r, 302, Some("https://storage.example.net/db.gz?sig=1")).unwrap();
        assert_eq!(away.header_value("dxpcloud-authorization"), None);
        assert_eq!(away.header_value("authorization"), None);
        assert_eq!(away.header_value("range"), Some("bytes=10-"), "non-credential headers carry over");
        let back = redirected(&r, &away, 307, Some("https://api.example.com/again")).unwrap();
        assert_eq!(back.header_value("authorization"), None, "once dropped, never re-added");
        // Another port or scheme is another origin.
        for other in ["https://api.example.com:8443/x", "http://api.example.com/x"] {
            let hop = redirected(&r, &r, 301, Some(other)).unwrap();
            assert_eq!(hop.header_value("authorization"), None, "{other}");
        }
    }

    #[test]
    fn see_other_and_post_redirects_continue_as_get_without_a_body() {
        let post = HttpRequest::post_json("https://api.example.com/graphql", &serde_json::json!({"q": 1}));
        for status in [301, 302, 303] {
            let next = redirected(&post, &post, status, Some("/elsewhere")).unwrap();
            assert_eq!(
                (next.method, next.body.is_none(), next.header_value("content-type")),
                (Method::Get, true, None)
            );
        }
        let kept = redirected(&post, &post, 307, Some("/elsewhere")).unwrap();
        assert_eq!((kept.method, kept.body.is_some()), (Method::Post, true));
    }

    #[test]
    fn a_body_is_never_re_sent_to_another_origin() {
        let login = HttpRequest::post_json(
            "https://blue-surf.cloud.dgraph.io/admin",
            &serde_json::json!({"variables": {"password": "hunter2"}}),
        );
        for status in [307, 308] {
            let e = redirected(&login, &login, status, Some("https://evil.example.net:8443/admin?sig=x")).unwrap_err();
            assert!(e.contains("https://blue-surf.cloud.dgraph.io:443"), "{e}");
            assert!(e.contains("https://evil.example.net:8443"), "{e}");
            assert!(!e.contains("hunter2") && !e.contains("sig=x"), "{e}");
            // Another port of the same host is another origin too.
            assert!(redirected(&login, &login, status, Some("https://blue-surf.cloud.dgraph.io:444/admin")).is_err());
            // Within the origin the body follows, as the standard says.
            let same = redirected(&login, &login, status, Some("/admin/v2")).unwrap();
            assert_eq!(same.body, login.body);
        }
        // A PUT keeps its body on a 301/302 too: refused as well.
        let mut put = HttpRequest::put("https://api.example.com/upload");
        put.body = Some(b"data".to_vec());
        assert!(redirected(&put, &put, 302, Some("https://other.example.com/u")).is_err());
        // A body-less request, or one that continues as a GET without its body, still follows.
        let get = authed();
        assert!(redirected(&get, &get, 307, Some("https://storage.example.net/db.gz")).is_ok());
        let away = redirected(&login, &login, 303, Some("https://other.example.com/done")).unwrap();
        assert_eq!((away.method, away.body), (Method::Get, None));
    }

    #[test]
    fn unusable_redirects_are_errors_that_name_the_host() {
        let r = authed();
        assert!(redirected(&r, &r, 302, None)
            .unwrap_err()
            .contains("api.example.com answered HTTP 302 without a Location"));
        assert!(redirected(&r, &r, 302, Some("  ")).is_err());
        assert!(redirected(&r, &r, 302, Some("ftp://x/y")).unwrap_err().contains("ftp"));
        assert!(is_redirect(308) && !is_redirect(304) && !is_redirect(300));
    }

    #[test]
    fn snippet_is_trimmed_and_cut() {
        let r = HttpResponse { status: 500, headers: vec![], body: b"  <html>oops</html>  ".to_vec() };
        assert_eq!(r.snippet(100), "<html>oops</html>");
        assert_eq!(r.snippet(6), "<html>…");
    }
}
