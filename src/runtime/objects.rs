//! Where a copy's objects go: the Worker's R2 bucket binding, or a bucket of an S3-compatible
//! service (a replica outside Cloudflare, `crate::s3`). Both offer what the copy engine, the
//! replica's manifest, its retention and the sweep need (put, get, head, list, delete, multipart
//! uploads), so those run unchanged against either. The S3 requests are built and signed by the
//! core; this performs them.

use std::collections::HashMap;

use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use worker::{Bucket, Data, Fetch, Headers, HttpMetadata, RequestInit, RequestRedirect, UploadedPart};

use super::net;
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::replica::ReplicaConfig;
use crate::s3::{S3Client, S3Config, S3Error, S3Keys};
use crate::sweep::StoredObject;
use crate::time::Timestamp;

/// Keys listed per S3 request (the API's own maximum).
const S3_PAGE: u32 = 1000;

/// A bucket of an S3-compatible service, with the key pair that signs its requests.
#[derive(Clone)]
pub(crate) struct S3Bucket {
    pub config: S3Config,
    pub keys: S3Keys,
}

/// A bucket objects are stored in.
#[derive(Clone)]
pub(crate) enum Objects {
    /// An R2 bucket binding.
    R2(Bucket),
    /// A bucket of an S3-compatible service.
    S3(Box<S3Bucket>),
}

fn r2(what: &str, key: &str, e: impl std::fmt::Display) -> StepError {
    StepError::transient(format!("R2 {what} of {key} failed: {e}"))
}

fn s3(what: &str, key: &str, e: S3Error) -> StepError {
    let message = format!("S3 {what} of {key}: {e}");
    if e.retryable {
        StepError::transient(message)
    } else {
        StepError::permanent(message)
    }
}

impl From<Bucket> for Objects {
    fn from(bucket: Bucket) -> Self {
        Self::R2(bucket)
    }
}

impl From<&Bucket> for Objects {
    fn from(bucket: &Bucket) -> Self {
        Self::R2(bucket.clone())
    }
}

impl From<&Objects> for Objects {
    fn from(objects: &Objects) -> Self {
        objects.clone()
    }
}

impl Objects {
    fn client(b: &S3Bucket) -> S3Client<'_> {
        S3Client::new(&b.config, &b.keys)
    }

    /// Sends one S3 request; a non-2xx answer other than `allowed` is the error S3 gave.
    async fn s3_exchange(what: &str, key: &str, req: HttpRequest, allowed: &[u16]) -> Result<HttpResponse, StepError> {
        let resp =
            net::exchange_here(&req).await.map_err(|e| StepError::transient(format!("S3 {what} of {key}: {e}")))?;
        if (200..300).contains(&resp.status) || allowed.contains(&resp.status) {
            return Ok(resp);
        }
        Err(s3(what, key, crate::s3::error_of(resp.status, &resp.body)))
    }

    /// Stores `body` at `key` in one request. The service checks the bytes against `sha256` (R2's
    /// SHA-256 check; S3's signed `x-amz-content-sha256`). Returns the size stored.
    pub(crate) async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        metadata: &HashMap<String, String>,
        sha256: [u8; 32],
    ) -> Result<u64, StepError> {
        let len = body.len() as u64;
        match self {
            Self::R2(bucket) => {
                let object = bucket
                    .put(key.to_string(), Data::Bytes(body))
                    .http_metadata(HttpMetadata { content_type: Some(content_type.into()), ..HttpMetadata::default() })
                    .custom_metadata(metadata.clone())
                    .sha256(sha256.to_vec())
                    .execute()
                    .await
                    .map_err(|e| r2("put", key, e))?
                    .ok_or_else(|| StepError::transient(format!("R2 refused the put of {key}")))?;
                Ok(object.size())
            }
            Self::S3(b) => {
                let meta: Vec<(&str, &str)> = metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let req = Self::client(b).put_object(key, body, content_type, &meta, super::now());
                Self::s3_exchange("put", key, req, &[]).await?;
                Ok(len)
            }
        }
    }

    /// The object's bytes; `None` when there is no such object.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StepError> {
        match self {
            Self::R2(bucket) => {
                let Some(object) = bucket.get(key.to_string()).execute().await.map_err(|e| r2("get", key, e))? else {
                    return Ok(None);
                };
                match object.body() {
                    Some(body) => Ok(Some(body.bytes().await.map_err(|e| r2("read", key, e))?)),
                    None => Ok(Some(Vec::new())),
                }
            }
            Self::S3(b) => {
                let req = Self::client(b).get_object(key, super::now());
                let resp = Self::s3_exchange("get", key, req, &[404]).await?;
                Ok((resp.status != 404).then_some(resp.body))
            }
        }
    }

    /// The object's size; `None` when there is no such object.
    pub(crate) async fn head(&self, key: &str) -> Result<Option<u64>, StepError> {
        match self {
            Self::R2(bucket) => {
                Ok(bucket.head(key.to_string()).await.map_err(|e| r2("head", key, e))?.map(|o| o.size()))
            }
            Self::S3(b) => {
                let req = Self::client(b).head_object(key, super::now());
                let resp = Self::s3_exchange("head", key, req, &[404]).await?;
                if resp.status == 404 {
                    return Ok(None);
                }
                let size = resp.header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
                size.map(Some).ok_or_else(|| StepError::transient(format!("S3 head of {key}: no content-length")))
            }
        }
    }

    /// Deletes one object (a missing one counts as deleted).
    pub(crate) async fn delete(&self, key: &str) -> Result<(), StepError> {
        match self {
            Self::R2(bucket) => bucket.delete(key.to_string()).await.map_err(|e| r2("delete", key, e)),
            Self::S3(b) => {
                let req = Self::client(b).delete_object(key, super::now());
                Self::s3_exchange("delete", key, req, &[404]).await.map(|_| ())
            }
        }
    }

    /// Deletes objects (R2 in calls of up to 1,000 keys; S3 one request each, which every
    /// S3-compatible service offers, unlike the batch call's `Content-MD5` variants).
    pub(crate) async fn delete_keys(&self, keys: &[String]) -> Result<(), StepError> {
        match self {
            Self::R2(bucket) => {
                for batch in keys.chunks(1000) {
                    let first = batch.first().cloned().unwrap_or_default();
                    bucket.delete_multiple(batch.to_vec()).await.map_err(|e| r2("delete", &first, e))?;
                }
                Ok(())
            }
            Self::S3(_) => {
                for key in keys {
                    self.delete(key).await?;
                }
                Ok(())
            }
        }
    }

    /// The key of every object under `prefix`, following the listing's cursor.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>, StepError> {
        let b = match self {
            Self::R2(bucket) => {
                let listed = super::store::list_objects(bucket, prefix).await.map_err(|e| r2("list", prefix, e))?;
                return Ok(listed.iter().map(worker::Object::key).collect());
            }
            Self::S3(b) => b,
        };
        let mut keys = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let req = Self::client(b).list_objects(prefix, None, cursor.as_deref(), S3_PAGE, super::now());
            let resp = Self::s3_exchange("list", prefix, req, &[]).await?;
            let page = crate::s3::parse_list(&resp.body).map_err(|e| s3("list", prefix, e))?;
            keys.extend(page.objects.into_iter().map(|o| o.key));
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// One page of a walk of the whole bucket in key order: from `cursor` (the previous page's),
    /// else after the key `after`. Returns the objects (an S3 object whose age is not given
    /// counts as written `now`, so it is never old enough to go) and the next page's cursor, if
    /// there is a next page.
    pub(crate) async fn walk_page(
        &self,
        after: Option<&str>,
        cursor: Option<String>,
        limit: u32,
        now: Timestamp,
    ) -> Result<(Vec<StoredObject>, Option<String>), StepError> {
        match self {
            Self::R2(bucket) => {
                let mut list = bucket.list().limit(limit);
                match (cursor, after) {
                    (Some(c), _) => list = list.cursor(c),
                    (None, Some(a)) => list = list.start_after(a.to_string()),
                    (None, None) => {}
                }
                let page = list.execute().await.map_err(|e| r2("list", "the bucket", e))?;
                Ok((page.objects().iter().map(stored).collect(), page.cursor().filter(|_| page.truncated())))
            }
            Self::S3(b) => {
                let after = if cursor.is_some() { None } else { after };
                let req = Self::client(b).list_objects_after("", None, cursor.as_deref(), after, limit, super::now());
                let resp = Self::s3_exchange("list", "the bucket", req, &[]).await?;
                let page = crate::s3::parse_list(&resp.body).map_err(|e| s3("list", "the bucket", e))?;
                let objects = page
                    .objects
                    .into_iter()
                    .map(|o| StoredObject { key: o.key, size: o.size, uploaded: o.last_modified.unwrap_or(now) })
                    .collect();
                Ok((objects, page.next))
            }
        }
    }

    /// Starts a multipart upload at `key`; returns its id.
    pub(crate) async fn create_upload(
        &self,
        key: &str,
        content_type: &str,
        metadata: &HashMap<String, String>,
    ) -> Result<String, StepError> {
        match self {
            Self::R2(bucket) => {
                let upload = bucket
                    .create_multipart_upload(key.to_string())
                    .http_metadata(HttpMetadata { content_type: Some(content_type.into()), ..HttpMetadata::default() })
                    .custom_metadata(metadata.clone())
                    .execute()
                    .await
                    .map_err(|e| r2("create multipart upload", key, e))?;
                Ok(upload.upload_id().await)
            }
            Self::S3(b) => {
                let meta: Vec<(&str, &str)> = metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let req = Self::client(b).create_multipart_upload(key, content_type, &meta, super::now());
                let resp = Self::s3_exchange("create multipart upload", key, req, &[]).await?;
                crate::s3::parse_upload_id(&resp.body).map_err(|e| s3("create multipart upload", key, e))
            }
        }
    }

    /// Starts sending one part (its bytes stay in JS memory) and returns at once: the future
    /// resolves to the part's ETag. An S3 part is signed with its SHA-256 (`digest`, the part's
    /// Web Crypto digest under way), so the service refuses bytes altered on the way.
    pub(crate) fn start_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        bytes: &Uint8Array,
        digest: &js_sys::Promise,
    ) -> Result<JsFuture, StepError> {
        let fail = |e: String| StepError::transient(format!("upload of part {number} of {key}: {e}"));
        match self {
            Self::R2(bucket) => {
                let upload = call(
                    bucket.as_ref(),
                    "resumeMultipartUpload",
                    &[&JsValue::from_str(key), &JsValue::from_str(upload_id)],
                )
                .map_err(fail)?;
                let started =
                    call(&upload, "uploadPart", &[&JsValue::from_f64(f64::from(number)), bytes]).map_err(fail)?;
                promise(started).map_err(fail)
            }
            Self::S3(b) => {
                let digest = JsFuture::from(digest.clone());
                let (b, key, upload_id, bytes) = ((**b).clone(), key.to_string(), upload_id.to_string(), bytes.clone());
                let sending = async move {
                    let digest = digest.await?;
                    let sha256 = hex::encode(Uint8Array::new(&digest).to_vec());
                    let req = S3Client::new(&b.config, &b.keys).upload_part(
                        &key,
                        &upload_id,
                        number,
                        &sha256,
                        u64::from(bytes.length()),
                        super::now(),
                    );
                    send_part(&req, &bytes).await.map(|etag| JsValue::from_str(&etag)).map_err(|(message, retry)| {
                        let error = js_sys::Error::new(&message);
                        let _ = Reflect::set(&error, &JsValue::from_str("permanent"), &JsValue::from_bool(!retry));
                        error.into()
                    })
                };
                Ok(JsFuture::from(wasm_bindgen_futures::future_to_promise(sending)))
            }
        }
    }

    /// What a part's settled future gave: its ETag, or the error (permanent when the service
    /// refused the request for good).
    pub(crate) fn part_answer(number: u16, settled: Result<JsValue, JsValue>) -> Result<String, StepError> {
        match settled {
            Ok(value) => value
                .as_string()
                .or_else(|| Reflect::get(&value, &JsValue::from_str("etag")).ok().and_then(|v| v.as_string()))
                .ok_or_else(|| StepError::transient(format!("no etag was returned for part {number}"))),
            Err(e) => {
                let permanent = Reflect::get(&e, &JsValue::from_str("permanent")).ok().and_then(|v| v.as_bool());
                let message = format!("upload of part {number} failed: {}", js_text(&e));
                Err(if permanent == Some(true) { StepError::permanent(message) } else { StepError::transient(message) })
            }
        }
    }

    /// Completes a multipart upload from its parts; returns the object's size. A completion
    /// cut off after it took effect is recognised by the object's size (`expected`).
    pub(crate) async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(u16, String)>,
        expected: u64,
    ) -> Result<u64, StepError> {
        let done = match self {
            Self::R2(bucket) => {
                let upload = bucket
                    .resume_multipart_upload(key.to_string(), upload_id.to_string())
                    .map_err(|e| r2("resume upload", key, e))?;
                let parts: Vec<UploadedPart> = parts.into_iter().map(|(n, etag)| UploadedPart::new(n, etag)).collect();
                upload.complete(parts).await.map(|o| o.size()).map_err(|e| r2("complete multipart upload", key, e))
            }
            Self::S3(b) => {
                let req = Self::client(b).complete_multipart_upload(key, upload_id, &parts, super::now());
                match Self::s3_exchange("complete multipart upload", key, req, &[]).await {
                    Ok(resp) => match crate::s3::check_complete(resp.status, &resp.body) {
                        // The answer does not say the size: the object's own does.
                        Ok(()) => self.head(key).await?.ok_or_else(|| {
                            StepError::transient(format!("S3 completed the upload of {key}, but has no such object"))
                        }),
                        Err(e) => Err(s3("complete multipart upload", key, e)),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        match done {
            Ok(size) => Ok(size),
            // Completed already by a slice cut off before it could record that.
            Err(e) => match self.head(key).await {
                Ok(Some(size)) if size == expected => Ok(size),
                _ => Err(e),
            },
        }
    }

    /// Aborts a multipart upload; `Ok(false)` when it no longer exists (completed or aborted).
    pub(crate) async fn abort(&self, key: &str, upload_id: &str) -> Result<bool, String> {
        match self {
            Self::R2(bucket) => {
                let aborted = match bucket.resume_multipart_upload(key.to_string(), upload_id.to_string()) {
                    Ok(open) => open.abort().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match aborted {
                    Ok(()) => Ok(true),
                    Err(e) if super::store::upload_gone(&e) => Ok(false),
                    Err(e) => Err(format!("R2 abort of the upload of {key} failed: {e}")),
                }
            }
            Self::S3(b) => {
                let req = Self::client(b).abort_multipart_upload(key, upload_id, super::now());
                match Self::s3_exchange("abort of the upload", key, req, &[404]).await {
                    Ok(resp) => Ok(resp.status != 404),
                    Err(e) => Err(e.message().to_string()),
                }
            }
        }
    }
}

/// An R2 object as the sweep judges it.
pub(crate) fn stored(object: &worker::Object) -> StoredObject {
    StoredObject {
        key: object.key(),
        size: object.size(),
        uploaded: Timestamp::from_millis(object.uploaded().as_millis() as i64),
    }
}

/// The bucket of a replica: an R2 binding, or an S3-compatible bucket whose key pair is read from
/// the Worker secret its config names.
pub(crate) fn replica(env: &worker::Env, replica: &ReplicaConfig) -> Result<Objects, String> {
    match replica {
        ReplicaConfig::R2 { bucket_binding } => env.bucket(bucket_binding).map(Objects::R2).map_err(|e| {
            format!(
                "no R2 bucket is bound as {bucket_binding} (the source's replica.bucket_binding): {e}; declare it in \
                 wrangler.toml's [[r2_buckets]]"
            )
        }),
        ReplicaConfig::S3(config) => {
            let name = &config.credentials_secret;
            let text = super::secret(env, name).ok_or_else(|| {
                format!("the Worker secret {name} (the replica's credentials_secret) is not set; set it to ACCESS_KEY_ID:SECRET_ACCESS_KEY")
            })?;
            let keys = S3Keys::parse(name, text.expose())?;
            Ok(Objects::S3(Box::new(S3Bucket { config: config.clone(), keys })))
        }
    }
}

/// The bucket of the replica called `name` (`ReplicaConfig::name`): the replica of that name in
/// the config, or else the R2 binding of that name (a job recorded before its source changed).
pub(crate) fn named(env: &worker::Env, name: &str) -> Result<Objects, String> {
    let configured = super::load_config(env)
        .ok()
        .and_then(|c| c.sources.iter().filter_map(|s| s.replica.clone()).find(|r| r.name() == name));
    match configured {
        Some(config) => replica(env, &config),
        None => env
            .bucket(name)
            .map(Objects::R2)
            .map_err(|e| format!("no replica bucket {name} is configured or bound: {e}")),
    }
}

/// The bucket of the replica called `name` as a job's settings describe it (`snapshot`, when it
/// is still that replica), else as [`named`] finds it.
pub(crate) fn named_as(env: &worker::Env, name: &str, snapshot: Option<&ReplicaConfig>) -> Result<Objects, String> {
    match snapshot {
        Some(config) if config.name() == name => replica(env, config),
        _ => named(env, name),
    }
}

/// Sends one S3 part from JS memory; the ETag, or the error and whether it is worth retrying.
async fn send_part(req: &HttpRequest, bytes: &Uint8Array) -> Result<String, (String, bool)> {
    let headers = Headers::new();
    for (k, v) in &req.headers {
        headers.set(k, v).map_err(|e| (format!("bad header {k}: {e}"), false))?;
    }
    let mut init = RequestInit::new();
    init.with_method(worker::Method::Put);
    init.with_headers(headers);
    init.with_redirect(RequestRedirect::Manual);
    init.with_body(Some(bytes.clone().into()));
    let request = worker::Request::new_with_init(&req.url, &init).map_err(|e| (e.to_string(), false))?;
    let mut resp = Fetch::Request(request).send().await.map_err(|e| (e.to_string(), true))?;
    let status = resp.status_code();
    if !(200..300).contains(&status) {
        let body = resp.bytes().await.unwrap_or_default();
        let e = crate::s3::error_of(status, &body);
        return Err((e.to_string(), e.retryable));
    }
    resp.headers().get("etag").ok().flatten().ok_or_else(|| ("the answer carried no ETag".to_string(), true))
}

pub(super) fn js_text(e: &JsValue) -> String {
    match e.dyn_ref::<js_sys::Error>() {
        Some(err) => String::from(err.message()),
        None => e.as_string().unwrap_or_else(|| format!("{e:?}")),
    }
}

/// Calls `target[method](...args)`, returning what it returns (a promise for async methods, so
/// the operation starts now, not when the future is first polled).
pub(super) fn call(target: &JsValue, method: &str, args: &[&JsValue]) -> Result<JsValue, String> {
    let f: js_sys::Function = Reflect::get(target, &JsValue::from_str(method))
        .map_err(|e| js_text(&e))?
        .dyn_into()
        .map_err(|_| format!("{method} is not a function"))?;
    let list = js_sys::Array::new();
    for a in args {
        list.push(a);
    }
    f.apply(target, &list).map_err(|e| js_text(&e))
}

pub(super) fn promise(value: JsValue) -> Result<JsFuture, String> {
    value.dyn_into::<js_sys::Promise>().map(JsFuture::from).map_err(|_| "expected a promise".to_string())
}

/// Starts Web Crypto's SHA-256 of some bytes: a promise, so one digest can be awaited by more
/// than one reader (an S3 part's signature and its record).
pub(crate) fn start_digest(bytes: &Uint8Array) -> Result<js_sys::Promise, String> {
    let crypto = Reflect::get(&js_sys::global(), &JsValue::from_str("crypto")).map_err(|e| js_text(&e))?;
    let subtle = Reflect::get(&crypto, &JsValue::from_str("subtle")).map_err(|e| js_text(&e))?;
    call(&subtle, "digest", &[&JsValue::from_str("SHA-256"), bytes])?
        .dyn_into::<js_sys::Promise>()
        .map_err(|_| "expected a promise".to_string())
}
