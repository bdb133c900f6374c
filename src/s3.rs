//! Requests to an S3-compatible object store, as values, and the reading of its answers.
//!
//! A source's replica may live outside Cloudflare, in any store that speaks the S3 API (AWS S3,
//! Backblaze B2, Wasabi, MinIO, Google Cloud Storage's interoperability endpoint). Such a store
//! has no Worker binding: it is reached with `fetch`, each request signed with AWS Signature
//! Version 4 in the `Authorization` header. This module builds those signed requests as
//! [`HttpRequest`] values (the signature is computed by the maintained `aws-sigv4` crate, at the
//! `now` handed in, never a clock read here) and parses the XML answers (`quick-xml`'s pull
//! reader; no input makes it panic). The runtime sends the requests and hands the answers back.
//!
//! Every signed request carries `x-amz-date`, `x-amz-content-sha256` (the SHA-256 of the payload,
//! so S3 refuses bytes altered on the way) and `authorization`, and signs `host` (taken from the
//! URL, with a non-default port; `fetch` sends the same, so the header itself is not returned).
//!
//! A key is sent as S3 expects it in the path (each byte outside `A-Za-z0-9-._~/` as `%XX`), so any
//! key round-trips, except one with a `.` or `..` segment: a URL parser (`fetch`'s among them)
//! resolves those before sending, and the signature would no longer match.

use std::time::{Duration, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use quick_xml::events::Event;
use quick_xml::Reader;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::StepError;
use crate::fields::FieldError;
use crate::http::{HttpRequest, Method};
use crate::secret::Secret;
use crate::time::Timestamp;

#[cfg(test)]
mod tests;

/// The prefix of every [`S3Config::label`], which tells an S3 replica's label from an R2 binding's name.
pub const LABEL_SCHEME: &str = "s3://";

/// The SHA-256 of no bytes, the payload hash of a request without a body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The last instant the signer can write (9999-12-31T23:59:59.999Z): `time` panics past it.
const LAST_SIGNABLE_MILLIS: u64 = 253_402_300_799_999;

/// The namespace of S3's XML documents.
const S3_XMLNS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// The bytes a key keeps in a URL path: S3's unreserved characters and `/`.
const PATH: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// The bytes a query value keeps: S3's unreserved characters only.
const QUERY: &AsciiSet = &PATH.add(b'/');

/// How the bucket appears in a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Addressing {
    /// `https://endpoint/bucket/key`: works with every S3-compatible store, and with any bucket name.
    #[default]
    Path,
    /// `https://bucket.endpoint-host/key`: AWS's preferred form; the endpoint must have a DNS name
    /// (and over https a bucket name with '.' will not match a wildcard certificate).
    Virtual,
}

/// A source's S3-compatible replica, from the config table
/// `replica = { endpoint = "https://s3.eu-central-1.amazonaws.com", region = "eu-central-1",
/// bucket = "ferry-copy", credentials_secret = "REPLICA_S3_KEYS" }`, with an optional
/// `addressing = "path" | "virtual"` (default `"path"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The store's base URL, normalised to `scheme://host[:port]` (no path, no trailing slash).
    #[serde(deserialize_with = "crate::fields::text")]
    pub endpoint: String,
    /// The region the signature is scoped to (`us-east-1` for most non-AWS stores; `auto` for some).
    #[serde(deserialize_with = "crate::fields::text")]
    pub region: String,
    /// The bucket.
    #[serde(deserialize_with = "crate::fields::text")]
    pub bucket: String,
    /// The name of the Worker secret holding `ACCESS_KEY_ID:SECRET_ACCESS_KEY` (see [`S3Keys`]).
    #[serde(deserialize_with = "crate::fields::secret_name")]
    pub credentials_secret: String,
    /// Path-style or virtual-hosted-style URLs.
    #[serde(default)]
    pub addressing: Addressing,
}

impl S3Config {
    /// Parses the table. Errors name the field (`endpoint`, `region`, `bucket`,
    /// `credentials_secret`, `addressing`): an unknown field "is not a known field", a missing one
    /// "is required".
    pub fn from_value(value: &Value) -> Result<Self, FieldError> {
        if !value.is_object() {
            return Err(FieldError::new(
                "",
                "must be a table, e.g. { endpoint = \"https://s3.eu-central-1.amazonaws.com\", region = \
                 \"eu-central-1\", bucket = \"ferry-copy\", credentials_secret = \"REPLICA_S3_KEYS\" }",
            ));
        }
        let mut config: Self = serde_path_to_error::deserialize(value.clone()).map_err(crate::fields::path_error)?;
        let (endpoint, ip_host) = normalise_endpoint(&config.endpoint)?;
        config.endpoint = endpoint;
        if !valid_region(&config.region) {
            return Err(FieldError::new(
                "region",
                format!(
                    "must be a region name of lowercase letters, digits and '-' (e.g. \"eu-central-1\"), got {:?}",
                    config.region
                ),
            ));
        }
        if !valid_bucket(&config.bucket) {
            return Err(FieldError::new(
                "bucket",
                format!(
                    "must be an S3 bucket name: 3 to 63 lowercase letters, digits, '.' and '-', starting and \
                     ending with a letter or digit, no \"..\"; got {:?}",
                    config.bucket
                ),
            ));
        }
        if config.credentials_secret.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            return Err(FieldError::new(
                "credentials_secret",
                "must be the name of a Worker secret (letters, digits, '_', not starting with a digit)",
            ));
        }
        if config.addressing == Addressing::Virtual && ip_host {
            return Err(FieldError::new(
                "addressing",
                "must be \"path\" for an endpoint whose host is an IP address (\"virtual\" puts the bucket \
                 in the host name)",
            ));
        }
        Ok(config)
    }

    /// A short label for logs and alerts: `s3://ferry-copy at https://s3.eu-central-1.amazonaws.com`.
    pub fn label(&self) -> String {
        format!("{LABEL_SCHEME}{} at {}", self.bucket, self.endpoint)
    }

    /// The endpoint's scheme and `host[:port]`.
    fn scheme_and_host(&self) -> (&str, &str) {
        self.endpoint.split_once("://").unwrap_or(("https", self.endpoint.as_str()))
    }

    /// The `Host` every request to the bucket carries.
    fn host(&self) -> String {
        let (_, host) = self.scheme_and_host();
        match self.addressing {
            Addressing::Path => host.to_string(),
            Addressing::Virtual => format!("{}.{host}", self.bucket),
        }
    }

    /// The bucket's URL, without a trailing slash (`https://host/bucket`, `https://bucket.host`).
    fn bucket_base(&self) -> String {
        let (scheme, host) = self.scheme_and_host();
        match self.addressing {
            Addressing::Path => format!("{scheme}://{host}/{}", self.bucket),
            Addressing::Virtual => format!("{scheme}://{}.{host}", self.bucket),
        }
    }
}

/// Checks an endpoint and writes it as `scheme://host[:port]`; also tells whether the host is an
/// IP address.
fn normalise_endpoint(text: &str) -> Result<(String, bool), FieldError> {
    let problem = |what: &str| FieldError::new("endpoint", format!("must be an http:// or https:// URL {what}"));
    // The value is not echoed: a URL with credentials in it is a secret pasted in the wrong place.
    let url = url::Url::parse(text).map_err(|e| problem(&format!("(it does not parse: {e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(problem("(another scheme was given)"));
    }
    let Some(host) = url.host() else {
        return Err(problem("with a host"));
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(problem("without credentials in it (the key pair goes in the secret named by credentials_secret)"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(problem("without a query or fragment"));
    }
    if !matches!(url.path(), "" | "/") {
        return Err(problem("without a path (the bucket goes in the bucket field)"));
    }
    let ip = !matches!(host, url::Host::Domain(_));
    let mut out = format!("{}://{host}", url.scheme());
    if let Some(port) = url.port() {
        out.push_str(&format!(":{port}"));
    }
    Ok((out, ip))
}

/// A region name: lowercase letters, digits and `-`.
fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An S3 bucket name: 3-63 lowercase letters, digits, `.` and `-`, starting and ending with a
/// letter or digit, without `..`.
fn valid_bucket(bucket: &str) -> bool {
    let b = bucket.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=63).contains(&b.len())
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || matches!(c, b'.' | b'-'))
        && !bucket.contains("..")
}

/// The key pair, from the Worker secret named by [`S3Config::credentials_secret`], whose text is
/// `ACCESS_KEY_ID:SECRET_ACCESS_KEY`. `Debug` never prints the secret key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Keys {
    /// The access key id (`AKIA…` on AWS, the key id on B2, the access key on MinIO).
    pub access_key_id: String,
    /// The secret access key.
    secret_access_key: Secret,
}

impl S3Keys {
    /// Reads the secret's text: surrounding whitespace is trimmed, and the text is split at its
    /// first `:` (so the secret key may itself contain `:`). Errors name the secret and the
    /// expected shape, never the value.
    pub fn parse(secret_name: &str, text: &str) -> Result<Self, String> {
        let shape = "ACCESS_KEY_ID:SECRET_ACCESS_KEY";
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("the secret {secret_name} is empty or not set; it must hold {shape}"));
        }
        let Some((id, secret)) = text.split_once(':') else {
            return Err(format!("the secret {secret_name} must hold {shape} (no ':' found)"));
        };
        if id.is_empty() || secret.is_empty() {
            return Err(format!("the secret {secret_name} must hold {shape} (one side of the ':' is empty)"));
        }
        let id_ok = id.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b',' | b'=' | b';'));
        if !id_ok {
            return Err(format!(
                "the secret {secret_name} must hold {shape}; its access key id may only hold printable ASCII \
                 without spaces, '/', ',', '=' or ';'"
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the secret {secret_name} must hold {shape}; its secret access key may only hold printable ASCII \
                 without spaces"
            ));
        }
        Ok(Self { access_key_id: id.to_string(), secret_access_key: Secret::new(secret) })
    }
}

/// What the signature says about the payload.
enum Payload<'b> {
    /// Bytes sent with the request: their SHA-256 is signed.
    Bytes(&'b [u8]),
    /// Bytes the runtime sends itself: their SHA-256 (lowercase hex) as given.
    Hash(&'b str),
}

/// Builds signed requests to one bucket. Every method takes `now`, the signature's date (S3
/// refuses a signature more than 15 minutes off its clock).
///
/// Signing cannot fail for what S3 accepts: header values outside printable ASCII are
/// percent-encoded and metadata names reduced to a header name's characters.
/// Only a URL the signer refuses outright (over 64 KiB: a key far past S3's 1024 bytes) leaves a
/// request unsigned, which S3 then refuses.
#[derive(Debug, Clone, Copy)]
pub struct S3Client<'a> {
    config: &'a S3Config,
    keys: &'a S3Keys,
}

impl<'a> S3Client<'a> {
    /// A client for `config`'s bucket, signing with `keys`.
    pub fn new(config: &'a S3Config, keys: &'a S3Keys) -> Self {
        Self { config, keys }
    }

    /// The object's URL: the key percent-encoded as S3 expects (`A-Za-z0-9-._~` and `/` kept,
    /// every other byte of its UTF-8 as `%XX`).
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{}", self.config.bucket_base(), utf8_percent_encode(key, PATH))
    }

    /// Uploads `body` at `key` in one request (`PUT`). The body's SHA-256 is signed, so S3 refuses
    /// bytes altered on the way; its length goes as a signed `content-length`; `metadata` goes as
    /// `x-amz-meta-NAME` headers.
    pub fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &[(&str, &str)],
        now: Timestamp,
    ) -> HttpRequest {
        let mut headers = object_headers(content_type, metadata);
        headers.push(("content-length".into(), body.len().to_string()));
        let mut request = self.signed(Method::Put, self.object_url(key), headers, Payload::Bytes(&body), now);
        request.body = Some(body);
        request
    }

    /// Reads the object (`GET`).
    pub fn get_object(&self, key: &str, now: Timestamp) -> HttpRequest {
        self.signed(Method::Get, self.object_url(key), Vec::new(), Payload::Bytes(&[]), now)
    }

    /// Reads bytes `first..=last` of the object (`GET` with a signed `range: bytes=first-last`).
    pub fn get_object_range(&self, key: &str, first: u64, last: u64, now: Timestamp) -> HttpRequest {
        let range = vec![("range".to_string(), format!("bytes={first}-{last}"))];
        self.signed(Method::Get, self.object_url(key), range, Payload::Bytes(&[]), now)
    }

    /// The object's headers (size, ETag, metadata) without its body (`HEAD`).
    pub fn head_object(&self, key: &str, now: Timestamp) -> HttpRequest {
        self.signed(Method::Head, self.object_url(key), Vec::new(), Payload::Bytes(&[]), now)
    }

    /// Deletes the object (`DELETE`; S3 answers 204 whether it existed or not).
    pub fn delete_object(&self, key: &str, now: Timestamp) -> HttpRequest {
        self.signed(Method::Delete, self.object_url(key), Vec::new(), Payload::Bytes(&[]), now)
    }

    /// Starts a multipart upload (`POST key?uploads`); the answer's upload id comes from
    /// [`parse_upload_id`]. The content type and metadata are the object's, as in [`Self::put_object`].
    pub fn create_multipart_upload(
        &self,
        key: &str,
        content_type: &str,
        metadata: &[(&str, &str)],
        now: Timestamp,
    ) -> HttpRequest {
        let headers = object_headers(content_type, metadata);
        let url = format!("{}?uploads", self.object_url(key));
        self.signed(Method::Post, url, headers, Payload::Bytes(&[]), now)
    }

    /// The signed request for one part whose bytes the runtime sends itself (they live in JS
    /// memory): `PUT key?partNumber=N&uploadId=ID`, `body: None`. `payload_sha256` is the part's
    /// SHA-256 in lowercase hex, signed as `x-amz-content-sha256`, so S3 refuses other bytes;
    /// `len` its length, sent and signed as `content-length` (the runtime sends exactly `len`
    /// bytes, as a fixed-length body). S3 answers with the part's `ETag` header, which
    /// [`Self::complete_multipart_upload`] needs.
    pub fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: u16,
        payload_sha256: &str,
        len: u64,
        now: Timestamp,
    ) -> HttpRequest {
        let url = format!(
            "{}?partNumber={part_number}&uploadId={}",
            self.object_url(key),
            utf8_percent_encode(upload_id, QUERY)
        );
        let headers = vec![("content-length".to_string(), len.to_string())];
        self.signed(Method::Put, url, headers, Payload::Hash(payload_sha256), now)
    }

    /// Completes a multipart upload (`POST key?uploadId=ID`) from its parts' numbers and ETags
    /// (as S3 returned them, quotes included), sent in ascending part order. S3 may answer 200 and
    /// still fail: judge the answer with [`check_complete`].
    pub fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u16, String)],
        now: Timestamp,
    ) -> HttpRequest {
        let mut sorted: Vec<&(u16, String)> = parts.iter().collect();
        sorted.sort_by_key(|(number, _)| *number);
        let mut xml = format!("<CompleteMultipartUpload xmlns=\"{S3_XMLNS}\">");
        for (number, etag) in sorted {
            xml.push_str(&format!(
                "<Part><PartNumber>{number}</PartNumber><ETag>{}</ETag></Part>",
                quick_xml::escape::partial_escape(etag.as_str())
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let body = xml.into_bytes();
        let url = format!("{}?uploadId={}", self.object_url(key), utf8_percent_encode(upload_id, QUERY));
        let headers = vec![
            ("content-type".to_string(), "application/xml".to_string()),
            ("content-length".to_string(), body.len().to_string()),
        ];
        let mut request = self.signed(Method::Post, url, headers, Payload::Bytes(&body), now);
        request.body = Some(body);
        request
    }

    /// Aborts a multipart upload (`DELETE key?uploadId=ID`), freeing its parts.
    pub fn abort_multipart_upload(&self, key: &str, upload_id: &str, now: Timestamp) -> HttpRequest {
        let url = format!("{}?uploadId={}", self.object_url(key), utf8_percent_encode(upload_id, QUERY));
        self.signed(Method::Delete, url, Vec::new(), Payload::Bytes(&[]), now)
    }

    /// Lists keys under `prefix` (ListObjectsV2: `GET bucket?list-type=2&prefix=…`), rolled up at
    /// `delimiter` when given, from `continuation` (a previous page's [`ListPage::next`]), at most
    /// `max_keys` (S3 caps it at 1000). The answer goes to [`parse_list`].
    pub fn list_objects(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: u32,
        now: Timestamp,
    ) -> HttpRequest {
        self.list_objects_after(prefix, delimiter, continuation, None, max_keys, now)
    }

    /// [`Self::list_objects`] of the keys after `start_after` (`start-after`, ignored by S3 once a
    /// continuation token is given): a walk of the bucket that resumes after the last key it judged.
    pub fn list_objects_after(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        start_after: Option<&str>,
        max_keys: u32,
        now: Timestamp,
    ) -> HttpRequest {
        let base = match self.config.addressing {
            Addressing::Path => self.config.bucket_base(),
            Addressing::Virtual => format!("{}/", self.config.bucket_base()),
        };
        let mut url = format!("{base}?list-type=2&prefix={}", utf8_percent_encode(prefix, QUERY));
        if let Some(delimiter) = delimiter {
            url.push_str(&format!("&delimiter={}", utf8_percent_encode(delimiter, QUERY)));
        }
        if let Some(token) = continuation {
            url.push_str(&format!("&continuation-token={}", utf8_percent_encode(token, QUERY)));
        }
        url.push_str(&format!("&max-keys={max_keys}"));
        if let Some(after) = start_after {
            url.push_str(&format!("&start-after={}", utf8_percent_encode(after, QUERY)));
        }
        self.signed(Method::Get, url, Vec::new(), Payload::Bytes(&[]), now)
    }

    /// The request to `url` (already encoded) with `headers` (lowercase names), signed: `host`
    /// is signed, and `x-amz-date`, `authorization` and `x-amz-content-sha256` follow `headers`.
    /// A request the signer refuses goes unsigned (see the type's documentation).
    fn signed(
        &self,
        method: Method,
        url: String,
        mut headers: Vec<(String, String)>,
        payload: Payload<'_>,
        now: Timestamp,
    ) -> HttpRequest {
        if let Ok(signature) = self.signature(method, &url, &headers, payload, now) {
            headers.extend(signature);
        }
        HttpRequest { method, url, headers, body: None }
    }

    /// The headers `aws-sigv4` adds to sign a request: `x-amz-date`, `authorization`,
    /// `x-amz-content-sha256`.
    fn signature(
        &self,
        method: Method,
        url: &str,
        headers: &[(String, String)],
        payload: Payload<'_>,
        now: Timestamp,
    ) -> Result<Vec<(String, String)>, String> {
        let host = self.config.host();
        let body = match payload {
            Payload::Bytes(bytes) => SignableBody::Bytes(bytes),
            Payload::Hash(hash) => SignableBody::Precomputed(header_value(hash)),
        };
        let mut settings = SigningSettings::default();
        // S3 signs the path as sent: encoded once, `//` and `.` segments kept.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let credentials = Credentials::new(
            self.keys.access_key_id.as_str(),
            self.keys.secret_access_key.expose(),
            None,
            None,
            "ferry-s3-keys",
        );
        // Never `SystemTime::now()`: it panics on wasm32. The signer's date formatting panics
        // past year 9999, so the instant is held within 1970..=9999.
        let millis = u64::try_from(now.millis()).unwrap_or(0).min(LAST_SIGNABLE_MILLIS);
        let time = UNIX_EPOCH + Duration::from_millis(millis);
        let signed_headers = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain([("host", host.as_str())]);
        let signable = SignableRequest::new(method.as_str(), url, signed_headers, body).map_err(|e| error_chain(&e))?;
        let output = v4::SigningParams::builder()
            .identity(&credentials.into())
            .region(&self.config.region)
            .name("s3")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| e.to_string())
            .and_then(|params| sign(signable, &params.into()).map_err(|e| error_chain(&e)))?;
        let (instructions, _signature) = output.into_parts();
        Ok(instructions.headers().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect())
    }
}

/// An error and its sources, joined (`aws-sigv4`'s errors say little on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// A header value every HTTP stack carries: a value of printable ASCII stays as it is; any other
/// is percent-encoded (control characters, bytes beyond ASCII, and `%` itself as `%XX`).
/// Surrounding spaces are dropped, as S3 would.
fn header_value(value: &str) -> String {
    const KEEP_OUT: &AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let value = value.trim_matches(' ');
    if value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        value.to_string()
    } else {
        utf8_percent_encode(value, KEEP_OUT).to_string()
    }
}

/// The `content-type` and `x-amz-meta-*` headers of an object. A metadata name is lowercased,
/// and any character other than a letter, digit or `-` becomes `-` (`job_id` goes as
/// `x-amz-meta-job-id`: many HTTP servers and proxies drop a header whose name has `_`, and the
/// signature, which covers it, then fails); of two names that end up
/// the same, the later value wins (one header each: the runtime sets headers, it does not append);
/// values go through [`header_value`].
fn object_headers(content_type: &str, metadata: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut headers = vec![("content-type".to_string(), header_value(content_type))];
    for (name, value) in metadata {
        let name: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        let name = format!("x-amz-meta-{name}");
        let value = header_value(value);
        match headers.iter_mut().find(|(k, _)| *k == name) {
            Some(header) => header.1 = value,
            None => headers.push((name, value)),
        }
    }
    headers
}

/// An S3 answer that is an error: S3's `<Code>` and `<Message>` (or the HTTP status where the body
/// is no S3 error document), and whether retrying may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("S3 answered {status} {code}: {message}{}", hint(code))]
pub struct S3Error {
    /// The HTTP status (200 for a failed CompleteMultipartUpload or a 200 answer that could not be read).
    pub status: u16,
    /// S3's error code (`SignatureDoesNotMatch`, `NoSuchKey`, …), or one made from the status
    /// (`ServiceUnavailable`), or `MalformedResponse` for a 200 answer that could not be read.
    pub code: String,
    /// S3's message, or what little the answer said.
    pub message: String,
    /// Worth retrying: 5xx, 429, 408, `SlowDown`, `RequestTimeout`, `InternalError`,
    /// `ServiceUnavailable`, `OperationAborted`.
    pub retryable: bool,
}

impl S3Error {
    /// An answer with status 200 whose body could not be read as the expected document.
    fn malformed(what: impl Into<String>) -> Self {
        Self { status: 200, code: "MalformedResponse".into(), message: what.into(), retryable: false }
    }
}

impl From<S3Error> for StepError {
    fn from(e: S3Error) -> Self {
        if e.retryable {
            StepError::transient(e.to_string())
        } else {
            StepError::permanent(e.to_string())
        }
    }
}

/// What to check for the permanent errors a configuration causes.
fn hint(code: &str) -> &'static str {
    match code {
        "SignatureDoesNotMatch" => " (check the secret's key pair)",
        "InvalidAccessKeyId" => " (check the access key id in the secret)",
        "AccessDenied" => " (check the key's permissions on the bucket)",
        "NoSuchBucket" => " (check the bucket name and the endpoint)",
        "AuthorizationHeaderMalformed" => " (check the region)",
        "PermanentRedirect" => " (the bucket lives at another endpoint or region)",
        "RequestTimeTooSkewed" => " (the Worker's clock and the store's disagree)",
        "NoSuchUpload" => " (the multipart upload was aborted, completed or expired)",
        _ => "",
    }
}

/// Codes that are never worth retrying, whatever the status.
const PERMANENT: [&str; 4] = ["SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "NoSuchBucket"];

/// Codes worth retrying, whatever the status.
const RETRYABLE: [&str; 5] = ["SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted"];

/// The error a non-2xx answer (or a 200 carrying an `<Error>` document) stands for.
pub fn error_of(status: u16, body: &[u8]) -> S3Error {
    let (code, message) = match error_document(body) {
        Some(found) => found,
        None => {
            let reason = reason(status);
            let code = if reason.is_empty() { format!("Http{status}") } else { reason.replace(' ', "") };
            let message = snippet(body).unwrap_or_else(|| {
                if reason.is_empty() {
                    format!("HTTP {status}")
                } else {
                    reason.to_string()
                }
            });
            (code, message)
        }
    };
    let retryable = !PERMANENT.contains(&code.as_str())
        && (status >= 500 || status == 429 || status == 408 || RETRYABLE.contains(&code.as_str()));
    S3Error { status, code, message, retryable }
}

/// The `<Error><Code>…</Code><Message>…</Message></Error>` of a body, if it is one.
fn error_document(body: &[u8]) -> Option<(String, String)> {
    let mut code = None;
    let mut message = String::new();
    let mut root_is_error = false;
    walk(body, |node| {
        match node {
            Node::Open(["Error"]) => root_is_error = true,
            Node::Close(["Error", "Code"], text) => code = Some(clip(text)),
            Node::Close(["Error", "Message"], text) => message = clip(text),
            _ => {}
        }
        Ok(())
    })
    .ok()?;
    let code = code.filter(|c| root_is_error && !c.is_empty())?;
    Some((code, message))
}

/// The start of a body that is not an S3 error document, as one line of printable text.
fn snippet(body: &[u8]) -> Option<String> {
    Some(clip(&String::from_utf8_lossy(body))).filter(|line| !line.is_empty())
}

/// Text as one line of at most [`CLIP`] printable characters (whitespace runs become one space).
fn clip(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut short: String = line.chars().filter(|c| !c.is_control()).take(CLIP).collect();
    if line.chars().count() > CLIP {
        short.push('…');
    }
    short
}

/// How much of an answer's text an error keeps.
const CLIP: usize = 300;

/// The reason phrase of the statuses an S3 store answers with ("" for others).
fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Reads a CreateMultipartUpload answer: `<InitiateMultipartUploadResult>…<UploadId>ID</UploadId>`.
pub fn parse_upload_id(body: &[u8]) -> Result<String, S3Error> {
    let mut id = None;
    let root = walk(body, |node| {
        if let Node::Close(["InitiateMultipartUploadResult", "UploadId"], text) = node {
            id = Some(text.trim().to_string());
        }
        Ok(())
    })
    .map_err(|e| S3Error::malformed(format!("the CreateMultipartUpload answer is not XML ({e})")))?;
    if root == "Error" {
        return Err(error_of(200, body));
    }
    match id {
        Some(id) if !id.is_empty() && root == "InitiateMultipartUploadResult" => Ok(id),
        _ => Err(S3Error::malformed("the CreateMultipartUpload answer has no UploadId")),
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// The key (XML-unescaped).
    pub key: String,
    /// The size in bytes.
    pub size: u64,
    /// When it was written (`LastModified`), when the answer says and it reads as RFC 3339.
    pub last_modified: Option<Timestamp>,
}

/// One page of a ListObjectsV2 answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPage {
    /// The objects, in S3's (key) order.
    pub objects: Vec<ListedObject>,
    /// The prefixes rolled up at the delimiter (`<CommonPrefixes><Prefix>`).
    pub common_prefixes: Vec<String>,
    /// The token of the next page (`NextContinuationToken`) when the page is truncated.
    pub next: Option<String>,
}

/// Reads a ListObjectsV2 answer (`<ListBucketResult>`). A truncated page without a continuation
/// token, an object without a key or size, or another document is an error.
pub fn parse_list(body: &[u8]) -> Result<ListPage, S3Error> {
    let mut page = ListPage::default();
    let mut key: Option<String> = None;
    let mut size: Option<u64> = None;
    let mut last_modified: Option<Timestamp> = None;
    let mut truncated = false;
    let mut token = None;
    let root = walk(body, |node| {
        match node {
            Node::Open(["ListBucketResult", "Contents"]) => {
                key = None;
                size = None;
                last_modified = None;
            }
            Node::Close(["ListBucketResult", "Contents", "Key"], text) => key = Some(text.to_string()),
            Node::Close(["ListBucketResult", "Contents", "Size"], text) => {
                size =
                    Some(text.trim().parse().map_err(|_| format!("an object's Size is not a whole number: {text:?}"))?);
            }
            Node::Close(["ListBucketResult", "Contents", "LastModified"], text) => {
                last_modified = Timestamp::parse_rfc3339(text.trim());
            }
            Node::Close(["ListBucketResult", "Contents"], _) => match (key.take(), size.take()) {
                (Some(key), Some(size)) => {
                    page.objects.push(ListedObject { key, size, last_modified: last_modified.take() })
                }
                _ => return Err("an object (Contents) lacks its Key or Size".into()),
            },
            Node::Close(["ListBucketResult", "CommonPrefixes", "Prefix"], text) => {
                page.common_prefixes.push(text.to_string());
            }
            Node::Close(["ListBucketResult", "IsTruncated"], text) => truncated = text.trim() == "true",
            Node::Close(["ListBucketResult", "NextContinuationToken"], text) => token = Some(text.to_string()),
            _ => {}
        }
        Ok(())
    })
    .map_err(|e| S3Error::malformed(format!("the ListObjectsV2 answer cannot be read ({e})")))?;
    match root.as_str() {
        "ListBucketResult" => {}
        "Error" => return Err(error_of(200, body)),
        _ => return Err(S3Error::malformed("the ListObjectsV2 answer is not a ListBucketResult")),
    }
    if truncated {
        match token.filter(|t| !t.is_empty()) {
            Some(t) => page.next = Some(t),
            None => {
                return Err(S3Error::malformed("the ListObjectsV2 page is truncated but has no NextContinuationToken"))
            }
        }
    }
    Ok(page)
}

/// Judges a CompleteMultipartUpload answer. S3 may answer 200 and fail afterwards, with an
/// `<Error>` document as the body ("a request could fail after the initial 200 OK response has
/// been sent", API_CompleteMultipartUpload): that, a non-2xx answer, or a body that is not a
/// `<CompleteMultipartUploadResult>` is an error.
pub fn check_complete(status: u16, body: &[u8]) -> Result<(), S3Error> {
    if !(200..300).contains(&status) {
        return Err(error_of(status, body));
    }
    match walk(body, |_| Ok(())) {
        Ok(root) if root == "CompleteMultipartUploadResult" => Ok(()),
        Ok(root) if root == "Error" => Err(error_of(status, body)),
        Ok(root) => Err(S3Error::malformed(format!(
            "the CompleteMultipartUpload answer is not a CompleteMultipartUploadResult (root {root:?})"
        ))),
        Err(e) => Err(S3Error::malformed(format!("the CompleteMultipartUpload answer cannot be read ({e})"))),
    }
}

/// One step of [`walk`]: an element opens (its path of local names from the root), or closes
/// with its own text (references resolved, CDATA included, not trimmed).
enum Node<'p> {
    Open(&'p [&'p str]),
    Close(&'p [&'p str], &'p str),
}

/// Reads an XML document, telling `visit` each element's opening and closing; returns the root
/// element's name. Errors (ill-formed XML, not UTF-8, a visitor's error) are text.
fn walk(body: &[u8], mut visit: impl FnMut(Node<'_>) -> Result<(), String>) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_string())?;
    let mut reader = Reader::from_str(text);
    let mut open = Open::default();
    let mut root: Option<String> = None;
    loop {
        let event = reader.read_event().map_err(|e| format!("ill-formed XML: {e}"))?;
        match event {
            Event::Start(start) => open.push(&start, &mut root, &mut visit)?,
            Event::Empty(start) => {
                open.push(&start, &mut root, &mut visit)?;
                open.pop(&mut visit)?;
            }
            Event::End(_) => open.pop(&mut visit)?,
            Event::Text(t) => open.append(&t.xml10_content())?,
            Event::CData(c) => open.append(&c.xml10_content())?,
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => match &*r {
                        "amp" => "&".into(),
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "quot" => "\"".into(),
                        "apos" => "'".into(),
                        other => return Err(format!("unknown entity &{other};")),
                    },
                    Err(e) => return Err(format!("bad character reference: {e}")),
                };
                open.append(&resolved)?;
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !open.names.is_empty() {
        return Err("the document ends inside an element".into());
    }
    root.ok_or_else(|| "no root element".to_string())
}

/// The elements [`walk`] is inside of, outermost first: each one's local name and own text.
#[derive(Default)]
struct Open {
    names: Vec<String>,
    texts: Vec<String>,
}

impl Open {
    /// An element opens: the first one is the root, and there is only one.
    fn push(
        &mut self,
        start: &quick_xml::events::BytesStart<'_>,
        root: &mut Option<String>,
        visit: &mut impl FnMut(Node<'_>) -> Result<(), String>,
    ) -> Result<(), String> {
        let name = start.local_name().into_inner();
        if self.names.is_empty() {
            if root.is_some() {
                return Err("more than one root element".into());
            }
            *root = Some(name.to_string());
        }
        self.names.push(name.to_string());
        self.texts.push(String::new());
        let path: Vec<&str> = self.names.iter().map(String::as_str).collect();
        visit(Node::Open(&path))
    }

    /// The innermost element closes: `visit` gets its path and text.
    fn pop(&mut self, visit: &mut impl FnMut(Node<'_>) -> Result<(), String>) -> Result<(), String> {
        if self.names.is_empty() {
            return Err("a closing tag without an opening one".into());
        }
        let own = self.texts.pop().unwrap_or_default();
        {
            let path: Vec<&str> = self.names.iter().map(String::as_str).collect();
            visit(Node::Close(&path, &own))?;
        }
        self.names.pop();
        Ok(())
    }

    /// Text inside the innermost element (whitespace around the root is allowed).
    fn append(&mut self, text: &str) -> Result<(), String> {
        match self.texts.last_mut() {
            Some(own) => {
                own.push_str(text);
                Ok(())
            }
            None if text.trim().is_empty() => Ok(()),
            None => Err("text outside the root element".into()),
        }
    }
}
