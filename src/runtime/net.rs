//! Outgoing HTTP with timeouts.
//!
//! `fetch` has no timeout of its own, so every request races an `AbortController` against a
//! `Delay`; a download also gives up when no bytes arrive for a while. Redirects are followed
//! here, not by `fetch` (`redirect: "manual"`), a bounded number of times, so that provider
//! credentials never leave the provider's origin, in headers or in a body (see
//! [`crate::http::redirected`]).

use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::StreamExt;
use worker::{
    AbortController, ByteStream, Delay, Fetch, Headers, Method, Request, RequestInit, RequestRedirect, Response,
};

use crate::http::{is_redirect, redirected, HttpRequest, HttpResponse, MAX_REDIRECTS};

/// How long an API call may take end to end.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a download may wait for its response headers.
pub(crate) const HEADERS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a download may go without receiving a byte.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest API answer read into memory.
const MAX_API_BODY: usize = 4 * 1024 * 1024;

fn to_request(req: &HttpRequest) -> Result<Request, String> {
    let headers = Headers::new();
    for (k, v) in &req.headers {
        headers.set(k, v).map_err(|e| format!("bad header {k}: {e}"))?;
    }
    let mut init = RequestInit::new();
    init.with_method(match req.method {
        crate::http::Method::Get => Method::Get,
        crate::http::Method::Post => Method::Post,
        crate::http::Method::Delete => Method::Delete,
        crate::http::Method::Put => Method::Put,
        crate::http::Method::Head => Method::Head,
    });
    init.with_headers(headers);
    init.with_redirect(RequestRedirect::Manual);
    if let Some(body) = &req.body {
        init.with_body(Some(js_sys::Uint8Array::from(body.as_slice()).into()));
    }
    Request::new_with_init(&req.url, &init).map_err(|e| format!("invalid request to {}: {e}", host(&req.url)))
}

/// The host of a URL, for messages that must not echo signed query strings.
pub(crate) fn host(url: &str) -> String {
    url::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_else(|| "?".into())
}

/// The host and port of a URL (no path or query), to tell two origins apart in messages.
fn authority(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => "?".into(),
        },
        Err(_) => "?".into(),
    }
}

/// Sends a request, following up to [`MAX_REDIRECTS`] redirects, and keeps the final request's
/// `AbortController`, so a download can be cut off early (a slice that used its budget stops
/// reading and aborts the rest of the body). Each hop has `timeout` for its headers.
pub(crate) async fn send_abortable(
    req: &HttpRequest,
    timeout: Duration,
) -> Result<(Response, AbortController), String> {
    send_following(req, timeout).await.map(|(resp, controller, _)| (resp, controller))
}

/// [`send_abortable`], also handing back the request that got the final answer (after redirects).
async fn send_following(
    req: &HttpRequest,
    timeout: Duration,
) -> Result<(Response, AbortController, HttpRequest), String> {
    let mut current = req.clone();
    for _ in 0..=MAX_REDIRECTS {
        let (resp, controller) = send_once(&current, timeout).await?;
        let status = resp.status_code();
        if !is_redirect(status) {
            return Ok((resp, controller, current));
        }
        let location = resp.headers().get("location").ok().flatten();
        controller.abort();
        current = redirected(req, &current, status, location.as_deref())?;
    }
    Err(format!("request to {} was redirected more than {MAX_REDIRECTS} times", host(&req.url)))
}

/// One request, no redirects followed.
async fn send_once(req: &HttpRequest, timeout: Duration) -> Result<(Response, AbortController), String> {
    let request = to_request(req)?;
    let controller = AbortController::default();
    let signal = controller.signal();
    let fetch = Fetch::Request(request);
    let sending = Box::pin(fetch.send_with_signal(&signal));
    let delay = Box::pin(Delay::from(timeout));
    let outcome = select(sending, delay).await;
    match outcome {
        Either::Left((Ok(resp), _)) => Ok((resp, controller)),
        Either::Left((Err(e), _)) => {
            controller.abort();
            Err(format!("request to {} failed: {e}", host(&req.url)))
        }
        Either::Right(((), _)) => {
            controller.abort();
            Err(format!("request to {} timed out after {} s", host(&req.url), timeout.as_secs()))
        }
    }
}

/// Runs `fut` for at most `limit`: `None` when it did not finish in time (the future is then
/// dropped). Every R2 and storage call runs inside one of these, so a call that never answers
/// cannot hold a source forever.
pub(crate) async fn within<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let fut = Box::pin(fut);
    let delay = Box::pin(Delay::from(limit));
    match select(fut, delay).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(((), _)) => None,
    }
}

/// Runs `fut` until it finishes or has run for `limit`, which `fut` itself may raise while it
/// runs (a copy that turns out unable to resume gets the invocation's ceiling): `None` when it
/// did not finish in time (the future is then dropped).
pub(crate) async fn within_limit<F: std::future::Future>(
    limit: &std::cell::Cell<Duration>,
    fut: F,
) -> Option<F::Output> {
    let started = js_sys::Date::now();
    let mut fut = Box::pin(fut);
    loop {
        let elapsed = Duration::from_millis((js_sys::Date::now() - started).max(0.0) as u64);
        let left = limit.get().saturating_sub(elapsed);
        if left.is_zero() {
            return None;
        }
        match select(fut, Box::pin(Delay::from(left))).await {
            Either::Left((value, _)) => return Some(value),
            Either::Right(((), pending)) => fut = pending,
        }
    }
}

/// A response's headers as lower-case name/value pairs.
pub(crate) fn header_pairs(resp: &Response) -> Vec<(String, String)> {
    resp.headers().entries().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect()
}

/// Sends an API request and reads its (small) answer.
pub(crate) async fn exchange(req: &HttpRequest) -> Result<HttpResponse, String> {
    let (resp, _controller, last) = send_following(req, API_TIMEOUT).await?;
    read_answer(req, resp, &last).await
}

/// Sends a request whose signature binds it to its URL (S3's) and reads its (small) answer,
/// following no redirect: a 3xx is the answer (S3's `PermanentRedirect` names the endpoint to use).
pub(crate) async fn exchange_here(req: &HttpRequest) -> Result<HttpResponse, String> {
    let (resp, _controller) = send_once(req, API_TIMEOUT).await?;
    read_answer(req, resp, req).await
}

/// Reads the answer `resp` to `req`, which `last` (after redirects) got.
async fn read_answer(req: &HttpRequest, mut resp: Response, last: &HttpRequest) -> Result<HttpResponse, String> {
    let status = resp.status_code();
    let headers = header_pairs(&resp);
    let (from, to) = (authority(&req.url), authority(&last.url));
    let html = headers.iter().any(|(k, v)| k == "content-type" && v.to_ascii_lowercase().contains("text/html"));
    if from != to && html {
        // An API call sent elsewhere that answers a web page: a sign-in page, a proxy's error.
        return Err(format!(
            "request to {from} was redirected to {to}, which answered with an HTML page (HTTP {status}), not the API"
        ));
    }
    if req.method == crate::http::Method::Head || matches!(status, 204 | 205 | 304) {
        // A HEAD's answer, and a 204's (an S3 delete's), have no body to read (`fetch` gives them none).
        return Ok(HttpResponse { status, headers, body: Vec::new() });
    }
    let mut stream = resp.stream().map_err(|e| format!("reading the answer from {}: {e}", host(&req.url)))?;
    let mut body = Vec::new();
    while let Some(chunk) = next_chunk(&mut stream, API_TIMEOUT).await? {
        if body.len() + chunk.len() > MAX_API_BODY {
            return Err(format!("the answer from {} is larger than {MAX_API_BODY} bytes", host(&req.url)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(HttpResponse { status, headers, body })
}

/// The next chunk of a body, `None` at its end; fails when nothing arrives within `idle`.
pub(crate) async fn next_chunk(stream: &mut ByteStream, idle: Duration) -> Result<Option<Vec<u8>>, String> {
    let delay = Box::pin(Delay::from(idle));
    match select(stream.next(), delay).await {
        Either::Left((Some(Ok(chunk)), _)) => Ok(Some(chunk)),
        Either::Left((Some(Err(e)), _)) => Err(format!("the connection broke: {e}")),
        Either::Left((None, _)) => Ok(None),
        Either::Right(((), _)) => Err(format!("no data received for {} s", idle.as_secs())),
    }
}
