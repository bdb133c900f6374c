//! Performs a restore's R2 work (the decisions are in `crate::restore`): reads the backup's
//! manifest, streams the dump out of R2 into D1's upload URL, writes a drill's record.
//!
//! The dump is never held whole: the R2 object's body is piped through a `FixedLengthStream` of
//! its known size into the `PUT`, so the upload carries a `Content-Length` and its bytes pass
//! through the runtime's streams, never through wasm memory.

use std::time::Duration;

use futures_util::StreamExt;
use js_sys::{Promise, Reflect};
use md5::{Digest, Md5};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use worker::{Bucket, Fetch, Headers, Method, Request, RequestInit};

mod pieces;

use super::{net, store};
use crate::error::StepError;
use crate::restore::{Io, IoDone};

/// How long one dump upload may take, in all (an alarm invocation runs at most 15 minutes).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(14 * 60);
/// How long reading a manifest or writing a record may take.
const R2_TIMEOUT: Duration = Duration::from_secs(120);

fn js_text(e: &JsValue) -> String {
    match e.dyn_ref::<js_sys::Error>() {
        Some(err) => String::from(err.message()),
        None => e.as_string().unwrap_or_else(|| format!("{e:?}")),
    }
}

fn transient(what: &str, e: impl std::fmt::Display) -> StepError {
    StepError::transient(format!("{what} failed: {e}"))
}

/// Performs one order of a restore of `source`.
pub(crate) async fn perform(bucket: &Bucket, source: &str, io: Io) -> Result<IoDone, StepError> {
    match io {
        Io::ReadManifest { key } => {
            let work = async {
                let key = match key {
                    Some(k) => k,
                    None => super::verify::newest_manifest(bucket, source).await?,
                };
                let manifest = store::read_manifest(bucket, &key).await.ok_or_else(|| {
                    StepError::permanent(format!("{key} is not a readable manifest of a committed backup"))
                })?;
                Ok(IoDone::Manifest(key, Box::new(manifest)))
            };
            net::within(R2_TIMEOUT, work)
                .await
                .unwrap_or_else(|| Err(StepError::transient("reading the manifest timed out")))
        }
        Io::Digest { key } => match net::within(UPLOAD_TIMEOUT, digest(bucket, &key)).await {
            Some(result) => result,
            None => Err(StepError::transient(format!(
                "reading the dump back from R2 did not finish within {} min",
                UPLOAD_TIMEOUT.as_secs() / 60
            ))),
        },
        Io::Record { key, record } => match net::within(R2_TIMEOUT, store::put_json(bucket, &key, &record)).await {
            Some(Ok(())) => Ok(IoDone::Recorded),
            Some(Err(e)) => Err(StepError::transient(e)),
            None => Err(StepError::transient("writing the drill's record timed out")),
        },
        Io::GraphLoad(_) => Err(StepError::permanent("internal: a graph load is performed by graph_load::run")),
        Io::PostPieces { request, pieces } => pieces::post(bucket, request, pieces).await,
        Io::Upload { key, size, url } => match net::within(UPLOAD_TIMEOUT, upload(bucket, &key, size, &url)).await {
            Some(result) => result,
            None => Err(StepError::transient(format!(
                "uploading the dump to D1 did not finish within {} min",
                UPLOAD_TIMEOUT.as_secs() / 60
            ))),
        },
    }
}

/// The MD5 and size of the R2 object `key`, read as a stream.
async fn digest(bucket: &Bucket, key: &str) -> Result<IoDone, StepError> {
    let object = bucket
        .get(key.to_string())
        .execute()
        .await
        .map_err(|e| transient("R2 get", e))?
        .ok_or_else(|| StepError::permanent(format!("the dump {key} is missing from R2")))?;
    let body = object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {key}")))?;
    let mut stream = body.stream().map_err(|e| transient("R2 read", e))?;
    let mut md5 = Md5::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| transient("R2 read", e))?;
        let before = size;
        size += chunk.len() as u64;
        md5.update(&chunk);
        super::transfer::yield_now_and_then(before, size).await;
    }
    Ok(IoDone::Digest { md5: hex::encode(md5.finalize()), size })
}

/// Streams the R2 object `key` (`size` bytes) to `url` with one `PUT`.
async fn upload(bucket: &Bucket, key: &str, size: u64, url: &str) -> Result<IoDone, StepError> {
    let get = Reflect::get(bucket.as_ref(), &JsValue::from_str("get")).map_err(|e| transient("R2 get", js_text(&e)))?;
    let get: js_sys::Function = get.dyn_into().map_err(|_| StepError::permanent("R2 get is not a function"))?;
    let promise: Promise = get
        .call1(bucket.as_ref(), &JsValue::from_str(key))
        .map_err(|e| transient("R2 get", js_text(&e)))?
        .dyn_into()
        .map_err(|_| StepError::permanent("R2 get returned no promise"))?;
    let object = JsFuture::from(promise).await.map_err(|e| transient("R2 get", js_text(&e)))?;
    if object.is_null() || object.is_undefined() {
        return Err(StepError::permanent(format!("the dump {key} is missing from R2")));
    }
    let stored = Reflect::get(&object, &JsValue::from_str("size")).ok().and_then(|v| v.as_f64()).unwrap_or(-1.0);
    if stored as u64 != size {
        return Err(StepError::permanent(format!(
            "the dump {key} holds {stored} bytes in R2, not the {size} its manifest records"
        )));
    }
    let body = Reflect::get(&object, &JsValue::from_str("body")).map_err(|e| transient("R2 get", js_text(&e)))?;
    // FixedLengthStream(size): the upload declares its length and the runtime checks it.
    let ctor: js_sys::Function = Reflect::get(&js_sys::global(), &JsValue::from_str("FixedLengthStream"))
        .ok()
        .and_then(|c| c.dyn_into().ok())
        .ok_or_else(|| StepError::permanent("this runtime has no FixedLengthStream"))?;
    let args = js_sys::Array::of1(&JsValue::from_f64(size as f64));
    let pair = Reflect::construct(&ctor, &args).map_err(|e| transient("FixedLengthStream", js_text(&e)))?;
    let readable = Reflect::get(&pair, &JsValue::from_str("readable")).map_err(|e| transient("stream", js_text(&e)))?;
    let writable = Reflect::get(&pair, &JsValue::from_str("writable")).map_err(|e| transient("stream", js_text(&e)))?;
    let pipe_to: js_sys::Function = Reflect::get(&body, &JsValue::from_str("pipeTo"))
        .ok()
        .and_then(|f| f.dyn_into().ok())
        .ok_or_else(|| StepError::permanent("the R2 body has no pipeTo"))?;
    let piping: Promise = pipe_to
        .call1(&body, &writable)
        .map_err(|e| transient("piping the dump", js_text(&e)))?
        .dyn_into()
        .map_err(|_| StepError::permanent("pipeTo returned no promise"))?;
    let headers = Headers::new();
    headers.set("content-length", &size.to_string()).map_err(|e| transient("headers", e))?;
    headers.set("content-type", "application/sql").map_err(|e| transient("headers", e))?;
    let mut init = RequestInit::new();
    init.with_method(Method::Put).with_headers(headers).with_body(Some(readable));
    let request = Request::new_with_init(url, &init).map_err(|e| StepError::permanent(format!("upload URL: {e}")))?;
    let sent = Fetch::Request(request).send().await;
    // The pipe settles with the upload; its own error, if any, says more than the fetch's.
    let piped = JsFuture::from(piping).await;
    let mut resp = sent.map_err(|e| match &piped {
        Err(p) => transient("uploading the dump to D1", format!("{e} (reading the dump from R2: {})", js_text(p))),
        Ok(_) => transient("uploading the dump to D1", e),
    })?;
    let status = resp.status_code();
    let etag = resp.headers().get("etag").ok().flatten();
    let text = resp.text().await.unwrap_or_default();
    let body: String = text.chars().take(300).collect();
    Ok(IoDone::Uploaded { status, etag, body: body.trim().to_string() })
}
