//! Performs [`Io::PostPieces`](crate::restore::Io::PostPieces): one `POST` (or D1's `PUT`) whose
//! body is text pieces and R2 objects in order (a `multipart/form-data` upload, a staged dump),
//! streamed, never held whole.
//!
//! Every R2 object is opened (and its size checked against the order) before anything is sent,
//! so a missing or altered object fails with nothing sent. The body's total length is known, so
//! it goes through a `FixedLengthStream(total)` and the request carries `Content-Length`; a writer
//! loop feeds the stream's writable side the text pieces and, chunk by chunk, each R2 object's
//! body. The chunks stay JavaScript values: they never pass through wasm memory.

use std::time::Duration;

use futures_util::future::{select, Either};
use js_sys::{Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use worker::{AbortController, Bucket, Fetch, Headers, Method, Request, RequestInit, RequestRedirect};

use super::super::net;
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::restore::{IoDone, Piece};

/// How long the upload may take, in all (an alarm invocation runs at most 15 minutes).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(14 * 60);
/// How long opening the R2 objects may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of the answer is kept.
const MAX_ANSWER: usize = 4096;

fn js_text(e: &JsValue) -> String {
    match e.dyn_ref::<js_sys::Error>() {
        Some(err) => String::from(err.message()),
        None => e.as_string().unwrap_or_else(|| format!("{e:?}")),
    }
}

/// Calls `target.name(args…)` and awaits the promise it returns (a plain value is returned as is).
async fn call(target: &JsValue, name: &str, args: &[&JsValue]) -> Result<JsValue, String> {
    let f: js_sys::Function = Reflect::get(target, &JsValue::from_str(name))
        .ok()
        .and_then(|f| f.dyn_into().ok())
        .ok_or_else(|| format!("{name} is not a function"))?;
    let array = js_sys::Array::new();
    for a in args {
        array.push(a);
    }
    let value = f.apply(target, &array).map_err(|e| format!("{name}: {}", js_text(&e)))?;
    match value.dyn_into::<Promise>() {
        Ok(promise) => JsFuture::from(promise).await.map_err(|e| format!("{name}: {}", js_text(&e))),
        Err(value) => Ok(value),
    }
}

fn field(target: &JsValue, name: &str) -> Result<JsValue, String> {
    Reflect::get(target, &JsValue::from_str(name)).map_err(|e| format!("{name}: {}", js_text(&e)))
}

/// A piece ready to be written: bytes, or an R2 object's body stream.
enum Source {
    Bytes(Uint8Array),
    Stream(JsValue),
}

/// Opens the R2 objects of `pieces`; `Err` (nothing sent) when one is missing or resized.
async fn open(bucket: &Bucket, pieces: &[Piece]) -> Result<Vec<Source>, StepError> {
    let mut sources = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match piece {
            Piece::Text(text) => sources.push(Source::Bytes(Uint8Array::from(text.as_bytes()))),
            Piece::Object { key, size } => {
                let object = call(bucket.as_ref(), "get", &[&JsValue::from_str(key)])
                    .await
                    .map_err(|e| StepError::transient(format!("R2 get {key} failed: {e}")))?;
                if object.is_null() || object.is_undefined() {
                    return Err(StepError::permanent(format!("{key} is missing from R2")));
                }
                let stored = field(&object, "size").ok().and_then(|v| v.as_f64()).unwrap_or(-1.0);
                if stored as u64 != *size {
                    return Err(StepError::permanent(format!(
                        "{key} holds {stored} bytes in R2, not the {size} its manifest records"
                    )));
                }
                let body = field(&object, "body").map_err(StepError::transient)?;
                sources.push(Source::Stream(body));
            }
        }
    }
    Ok(sources)
}

/// Writes every source into `writer` in order, then closes it.
async fn write_all(writer: &JsValue, sources: Vec<Source>) -> Result<(), String> {
    for source in sources {
        match source {
            Source::Bytes(bytes) => {
                call(writer, "write", &[&bytes]).await?;
            }
            Source::Stream(body) => {
                let reader = call(&body, "getReader", &[]).await?;
                loop {
                    let chunk = call(&reader, "read", &[]).await.map_err(|e| format!("reading from R2: {e}"))?;
                    if field(&chunk, "done")?.as_bool() == Some(true) {
                        break;
                    }
                    call(writer, "write", &[&field(&chunk, "value")?]).await?;
                }
            }
        }
    }
    call(writer, "close", &[]).await.map(|_| ())
}

/// Streams the body into the request and waits for the answer.
async fn send(request: &HttpRequest, total: u64, sources: Vec<Source>) -> Result<HttpResponse, String> {
    let ctor: js_sys::Function = Reflect::get(&js_sys::global(), &JsValue::from_str("FixedLengthStream"))
        .ok()
        .and_then(|c| c.dyn_into().ok())
        .ok_or("this runtime has no FixedLengthStream")?;
    let pair = Reflect::construct(&ctor, &js_sys::Array::of1(&JsValue::from_f64(total as f64)))
        .map_err(|e| format!("FixedLengthStream: {}", js_text(&e)))?;
    let readable = field(&pair, "readable")?;
    let writable = field(&pair, "writable")?;
    let writer = call(&writable, "getWriter", &[]).await?;

    let headers = Headers::new();
    for (k, v) in &request.headers {
        headers.set(k, v).map_err(|e| format!("bad header {k}: {e}"))?;
    }
    headers.set("content-length", &total.to_string()).map_err(|e| format!("headers: {e}"))?;
    let mut init = RequestInit::new();
    init.with_method(match request.method {
        crate::http::Method::Put => Method::Put,
        _ => Method::Post,
    })
    .with_headers(headers)
    .with_redirect(RequestRedirect::Manual)
    .with_body(Some(readable));
    let req = Request::new_with_init(&request.url, &init).map_err(|e| format!("the upload request: {e}"))?;
    let controller = AbortController::default();
    let signal = controller.signal();
    let fetch = Fetch::Request(req);
    let sending = Box::pin(fetch.send_with_signal(&signal));
    let writing = Box::pin(write_all(&writer, sources));
    let abort_writer = |why: &str| {
        // Fire and forget: the abort's promise settles with the stream.
        if let Some(f) =
            Reflect::get(&writer, &JsValue::from_str("abort")).ok().and_then(|f| f.dyn_into::<js_sys::Function>().ok())
        {
            let _ = f.call1(&writer, &JsValue::from_str(why));
        }
    };
    let (sent, written) = match select(sending, writing).await {
        Either::Left((sent, writing)) => {
            // The answer came first: whatever is left to write is not wanted any more.
            if sent.is_err() {
                abort_writer("the upload failed");
            }
            let written = net::within(Duration::from_secs(30), writing).await;
            if written.is_none() {
                abort_writer("the upload was answered");
            }
            (sent, written.unwrap_or(Ok(())))
        }
        Either::Right((written, sending)) => {
            if written.is_err() {
                abort_writer("reading from R2 failed");
                controller.abort();
            }
            (sending.await, written)
        }
    };
    let mut resp = sent.map_err(|e| match &written {
        Err(w) => format!("{e} (writing the body: {w})"),
        Ok(()) => e.to_string(),
    })?;
    let status = resp.status_code();
    let headers = net::header_pairs(&resp);
    let text = resp.text().await.unwrap_or_default();
    let mut body = text.into_bytes();
    body.truncate(MAX_ANSWER);
    Ok(HttpResponse { status, headers, body })
}

/// Performs the order: `Err` when nothing was sent, else the answer or why none came.
pub(super) async fn post(bucket: &Bucket, request: HttpRequest, pieces: Vec<Piece>) -> Result<IoDone, StepError> {
    let total: u64 = pieces.iter().map(Piece::length).sum();
    let sources = match net::within(OPEN_TIMEOUT, open(bucket, &pieces)).await {
        Some(sources) => sources?,
        None => return Err(StepError::transient("opening the archives in R2 timed out")),
    };
    let host = net::host(&request.url);
    Ok(IoDone::Posted(match net::within(UPLOAD_TIMEOUT, send(&request, total, sources)).await {
        Some(Ok(resp)) => Ok(resp),
        Some(Err(e)) => Err(format!("the upload to {host} failed: {e}")),
        None => Err(format!("the upload to {host} got no answer within {} min", UPLOAD_TIMEOUT.as_secs() / 60)),
    }))
}
