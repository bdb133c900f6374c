//! Streaming artifacts into R2, committing manifests, cleaning up failures.
//!
//! An artifact (a download, or the graph export Ferry writes itself) is taken chunk by chunk,
//! hashed with SHA-256 on the way, and never held whole:
//! - small (it ends before one part is full): one `put` with R2's server-side `sha256` check and
//!   the hash in the object's custom metadata;
//! - otherwise: a multipart upload of equal `part_size` parts (R2's rule: all but the last equal,
//!   at least 5 MiB, at most 10,000) into a staging key. Custom metadata is fixed when a multipart
//!   upload is created, before the hash is known, so the staged object is then copied part by
//!   part to its final key, whose upload carries the hash in its metadata; every part is read
//!   back and hashed again, and the copy is kept only if that hash equals the download's. Then
//!   the staging key is deleted.
//!
//! Every open multipart upload is recorded in the Durable Object's storage before its first part,
//! so an attempt interrupted by a restart is aborted by the next one; any failure aborts it too.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use worker::{Bucket, Data, HttpMetadata, MultipartUpload, Object, Range, Storage, UploadedPart};

use super::net;
use crate::config::MAX_PART_SIZE;
use crate::error::StepError;
use crate::http::status_error;
use crate::job::{CopyOrder, CopySource, JobId};
use crate::manifest::{Artifact, Manifest};
use crate::providers::aura::GraphExport;

/// Durable Object storage key of the open multipart upload, if any.
const OPEN_UPLOAD: &str = "open_upload";
/// R2's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// Bytes processed between two yields to the event loop.
const YIELD_EVERY: u64 = 1 << 20;

/// A multipart upload that has been created and not yet completed or aborted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenUpload {
    key: String,
    upload_id: String,
}

/// Where an artifact is staged while its multipart upload runs.
fn staging_key(key: &str) -> String {
    match key.rsplit_once('/') {
        Some((folder, name)) => format!("{folder}/.staging/{name}"),
        None => format!(".staging/{key}"),
    }
}

fn r2_err(what: &str, e: worker::Error) -> StepError {
    StepError::transient(format!("R2 {what} failed: {e}"))
}

/// Aborts a multipart upload left open by an interrupted attempt.
pub(crate) async fn abort_leftover(bucket: &Bucket, storage: &Storage) {
    if let Ok(Some(text)) = storage.get::<String>(OPEN_UPLOAD).await {
        if let Ok(open) = serde_json::from_str::<OpenUpload>(&text) {
            if let Ok(upload) = bucket.resume_multipart_upload(open.key.clone(), open.upload_id.clone()) {
                let _ = upload.abort().await;
            }
        }
        let _ = storage.delete(OPEN_UPLOAD).await;
    }
}

/// Metadata stored on every artifact.
fn artifact_metadata(order: &CopyOrder, job: &JobId, sha256: &str) -> HashMap<String, String> {
    HashMap::from([
        ("sha256".to_string(), sha256.to_string()),
        ("job_id".to_string(), job.to_string()),
        ("filename".to_string(), order.filename.clone()),
    ])
}

fn content_type(order: &CopyOrder) -> HttpMetadata {
    HttpMetadata { content_type: Some(order.content_type.clone()), ..HttpMetadata::default() }
}

/// One artifact on its way into R2: hashed, buffered one part at a time, uploaded.
struct Transfer<'a> {
    bucket: &'a Bucket,
    storage: &'a Storage,
    order: &'a CopyOrder,
    staging: String,
    part_size: usize,
    hasher: Sha256,
    total: u64,
    buf: Vec<u8>,
    multipart: Option<(MultipartUpload, Vec<UploadedPart>)>,
}

impl<'a> Transfer<'a> {
    fn new(bucket: &'a Bucket, storage: &'a Storage, order: &'a CopyOrder) -> Self {
        let part_size = order.part_size.clamp(crate::config::MIN_PART_SIZE, MAX_PART_SIZE) as usize;
        Self {
            bucket,
            storage,
            order,
            staging: staging_key(&order.key),
            part_size,
            hasher: Sha256::new(),
            total: 0,
            buf: Vec::new(),
            multipart: None,
        }
    }

    /// Takes the next bytes of the artifact; uploads a part each time one is full.
    async fn push(&mut self, mut chunk: &[u8]) -> Result<(), StepError> {
        self.hasher.update(chunk);
        let before = self.total;
        self.total += chunk.len() as u64;
        if before / YIELD_EVERY != self.total / YIELD_EVERY {
            // Hashing a fast stream can keep this object's thread busy for seconds; let queued
            // requests (status queries) run in between.
            worker::Delay::from(std::time::Duration::ZERO).await;
        }
        while !chunk.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.part_size.min(chunk.len().max(1 << 20)));
            }
            let take = (self.part_size - self.buf.len()).min(chunk.len());
            self.buf.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.buf.len() == self.part_size {
                let part = std::mem::take(&mut self.buf);
                self.upload_part(part).await?;
            }
        }
        Ok(())
    }

    async fn upload_part(&mut self, part: Vec<u8>) -> Result<(), StepError> {
        if self.multipart.is_none() {
            let upload = self
                .bucket
                .create_multipart_upload(self.staging.clone())
                .http_metadata(content_type(self.order))
                .execute()
                .await
                .map_err(|e| r2_err("create multipart upload", e))?;
            let open = OpenUpload { key: self.staging.clone(), upload_id: upload.upload_id().await };
            let text = serde_json::to_string(&open).map_err(|e| StepError::permanent(e.to_string()))?;
            self.storage.put(OPEN_UPLOAD, text).await.map_err(|e| r2_err("recording the upload", e))?;
            self.multipart = Some((upload, Vec::new()));
        }
        let Some((upload, parts)) = self.multipart.as_mut() else { return Ok(()) };
        let number = parts.len() as u64 + 1;
        if number > MAX_PARTS {
            return Err(StepError::permanent(format!(
                "{} needs more than {MAX_PARTS} parts of {} MiB; raise part_size_mib",
                self.order.filename,
                self.order.part_size >> 20
            )));
        }
        let uploaded = upload.upload_part(number as u16, part).await.map_err(|e| r2_err("upload part", e))?;
        parts.push(uploaded);
        Ok(())
    }

    /// Aborts whatever is open and removes the staging object (best effort).
    async fn clean_up(&mut self) {
        if let Some((upload, _)) = self.multipart.take() {
            let _ = upload.abort().await;
        }
        let _ = self.storage.delete(OPEN_UPLOAD).await;
        let _ = self.bucket.delete(self.staging.clone()).await;
    }

    /// Stores what was pushed at the final key, with its hash in the metadata.
    async fn finish(&mut self, job: &JobId, details: Option<serde_json::Value>) -> Result<Artifact, StepError> {
        let order = self.order;
        let total = self.total;
        let digest = std::mem::take(&mut self.hasher).finalize().to_vec();
        let sha256 = hex::encode(&digest);
        let metadata = artifact_metadata(order, job, &sha256);
        let buf = std::mem::take(&mut self.buf);
        let (stored, parts) = if self.multipart.is_none() {
            let object = self
                .bucket
                .put(order.key.clone(), Data::Bytes(buf))
                .http_metadata(content_type(order))
                .custom_metadata(metadata)
                .sha256(digest)
                .execute()
                .await
                .map_err(|e| r2_err("put", e))?
                .ok_or_else(|| StepError::transient("R2 put was refused by a precondition"))?;
            (object.size(), 1)
        } else {
            if !buf.is_empty() {
                self.upload_part(buf).await?;
            }
            let Some((upload, parts)) = self.multipart.take() else {
                return Err(StepError::permanent("multipart upload vanished"));
            };
            let count = parts.len() as u32;
            let staged = upload.complete(parts).await.map_err(|e| r2_err("complete multipart upload", e))?;
            let _ = self.storage.delete(OPEN_UPLOAD).await;
            if staged.size() != total {
                return Err(StepError::transient(format!(
                    "R2 stored {} bytes of {total} for {}",
                    staged.size(),
                    order.filename
                )));
            }
            let object =
                copy_object(self.bucket, &self.staging, order, self.part_size as u64, total, digest, metadata).await?;
            let _ = self.bucket.delete(self.staging.clone()).await;
            (object.size(), count)
        };
        if stored != total {
            return Err(StepError::transient(format!("R2 stored {stored} bytes of {total} for {}", order.filename)));
        }
        Ok(Artifact {
            key: order.key.clone(),
            filename: order.filename.clone(),
            size: total,
            sha256,
            content_type: order.content_type.clone(),
            parts,
            details,
        })
    }
}

/// Streams a GET's body into the transfer.
async fn download_into(
    t: &mut Transfer<'_>,
    request: &crate::http::HttpRequest,
    job: &JobId,
) -> Result<Artifact, StepError> {
    let order = t.order;
    let mut resp = net::send(request, net::HEADERS_TIMEOUT).await.map_err(StepError::transient)?;
    let status = resp.status_code();
    if !(200..300).contains(&status) {
        let mut stream = resp.stream().map_err(|e| StepError::transient(e.to_string()))?;
        let first = net::next_chunk(&mut stream, net::IDLE_TIMEOUT).await.ok().flatten().unwrap_or_default();
        let text: String = String::from_utf8_lossy(&first).chars().take(200).collect();
        let message = format!("download of {} was refused (HTTP {status}): {}", order.filename, text.trim());
        // Keep the real headers so a 429/503's Retry-After is honoured.
        let http = crate::http::HttpResponse { status, headers: net::header_pairs(&resp), body: Vec::new() };
        return Err(status_error(&http, super::now(), message));
    }
    // A length is only trustworthy for bytes received as sent (no transparent decoding).
    let encoded = resp.headers().get("content-encoding").ok().flatten().is_some_and(|e| e != "identity");
    let declared = if encoded {
        None
    } else {
        resp.headers().get("content-length").ok().flatten().and_then(|v| v.trim().parse::<u64>().ok())
    };
    let mut stream = resp.stream().map_err(|e| StepError::transient(e.to_string()))?;
    while let Some(chunk) = net::next_chunk(&mut stream, net::IDLE_TIMEOUT)
        .await
        .map_err(|e| StepError::transient(format!("download of {}: {e}", order.filename)))?
    {
        t.push(&chunk).await?;
    }
    if let Some(expected) = declared {
        if t.total != expected {
            return Err(StepError::transient(format!(
                "download of {} ended after {} of {expected} bytes",
                order.filename, t.total
            )));
        }
    }
    t.finish(job, None).await
}

/// Pages through a Neo4j graph and streams the gzip JSON Lines into the transfer.
async fn graph_into(t: &mut Transfer<'_>, spec: &GraphExport, job: &JobId) -> Result<Artifact, StepError> {
    let mut writer = spec.start();
    while let Some(request) = writer.next_request() {
        let resp = net::exchange(&request).await.map_err(StepError::transient)?;
        writer.on_response(&resp, super::now())?;
        let out = writer.take_output();
        t.push(&out).await?;
    }
    let (rest, details) = writer.finish()?;
    t.push(&rest).await?;
    t.finish(job, Some(details)).await
}

/// Streams one artifact into R2 at `order.key`. On failure nothing of it is left behind.
pub(crate) async fn copy(
    bucket: &Bucket,
    storage: &Storage,
    order: &CopyOrder,
    job: &JobId,
) -> Result<Artifact, StepError> {
    abort_leftover(bucket, storage).await;
    let mut transfer = Transfer::new(bucket, storage, order);
    let _ = bucket.delete(transfer.staging.clone()).await;
    let result = match &order.source {
        CopySource::Http(request) => download_into(&mut transfer, request, job).await,
        CopySource::Graph(spec) => graph_into(&mut transfer, spec, job).await,
    };
    match result {
        Ok(artifact) => Ok(artifact),
        Err(e) => {
            transfer.clean_up().await;
            let _ = bucket.delete(order.key.clone()).await;
            Err(e)
        }
    }
}

/// Copies the staged object to its final key, part by part: each range is read back from R2
/// (one part in memory), hashed again, and uploaded to a multipart upload created with the hash
/// in its metadata. The re-read hash must equal the download's, so what R2 holds is verified.
async fn copy_object(
    bucket: &Bucket,
    from: &str,
    order: &CopyOrder,
    part_size: u64,
    size: u64,
    digest: Vec<u8>,
    metadata: HashMap<String, String>,
) -> Result<Object, StepError> {
    let upload = bucket
        .create_multipart_upload(order.key.clone())
        .http_metadata(content_type(order))
        .custom_metadata(metadata)
        .execute()
        .await
        .map_err(|e| r2_err("create multipart upload", e))?;
    match copy_parts(bucket, from, part_size, size, &upload).await {
        Ok((parts, reread)) if reread == digest => {
            upload.complete(parts).await.map_err(|e| r2_err("complete multipart upload", e))
        }
        Ok(_) => {
            let _ = upload.abort().await;
            Err(StepError::transient(format!(
                "{}: the bytes read back from R2 do not match the download's SHA-256",
                order.filename
            )))
        }
        Err(e) => {
            let _ = upload.abort().await;
            Err(e)
        }
    }
}

async fn copy_parts(
    bucket: &Bucket,
    from: &str,
    part_size: u64,
    size: u64,
    upload: &MultipartUpload,
) -> Result<(Vec<UploadedPart>, Vec<u8>), StepError> {
    let mut hasher = Sha256::new();
    let mut parts = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let length = part_size.min(size - offset);
        let piece = bucket
            .get(from.to_string())
            .range(Range::OffsetWithLength { offset, length })
            .execute()
            .await
            .map_err(|e| r2_err("get range", e))?
            .ok_or_else(|| StepError::transient("the staged object disappeared"))?;
        let bytes = piece
            .body()
            .ok_or_else(|| StepError::transient("R2 returned no body"))?
            .bytes()
            .await
            .map_err(|e| r2_err("read range", e))?;
        if bytes.len() as u64 != length {
            return Err(StepError::transient(format!("R2 returned {} bytes of a {length}-byte range", bytes.len())));
        }
        hasher.update(&bytes);
        let number = parts.len() as u16 + 1;
        parts.push(upload.upload_part(number, Data::Bytes(bytes)).await.map_err(|e| r2_err("upload part", e))?);
        offset += length;
    }
    Ok((parts, hasher.finalize().to_vec()))
}

/// Writes a manifest, the commit marker, after every artifact is stored.
pub(crate) async fn write_manifest(bucket: &Bucket, key: &str, manifest: &Manifest) -> Result<(), String> {
    let body = serde_json::to_vec_pretty(manifest).map_err(|e| e.to_string())?;
    let digest = Sha256::digest(&body).to_vec();
    let metadata = HashMap::from([("sha256".to_string(), hex::encode(&digest))]);
    bucket
        .put(key.to_string(), Data::Bytes(body))
        .http_metadata(HttpMetadata { content_type: Some("application/json".into()), ..HttpMetadata::default() })
        .custom_metadata(metadata)
        .sha256(digest)
        .execute()
        .await
        .map_err(|e| format!("R2 put of the manifest failed: {e}"))?
        .ok_or_else(|| "R2 refused the manifest put".to_string())?;
    Ok(())
}

/// Every key under `prefix`, following R2's cursor.
pub(crate) async fn list_keys(bucket: &Bucket, prefix: &str) -> worker::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut list = bucket.list().prefix(prefix.to_string()).limit(1000);
        if let Some(c) = cursor.take() {
            list = list.cursor(c);
        }
        let page = list.execute().await?;
        keys.extend(page.objects().iter().map(Object::key));
        match (page.truncated(), page.cursor()) {
            (true, Some(c)) => cursor = Some(c),
            _ => break,
        }
    }
    Ok(keys)
}

/// Deletes everything under a failed job's folder and aborts its open upload (best effort).
pub(crate) async fn discard(bucket: &Bucket, storage: &Storage, folder: &str) -> Result<usize, String> {
    abort_leftover(bucket, storage).await;
    let keys = list_keys(bucket, folder).await.map_err(|e| e.to_string())?;
    for batch in keys.chunks(1000) {
        bucket.delete_multiple(batch.to_vec()).await.map_err(|e| e.to_string())?;
    }
    Ok(keys.len())
}

/// Reads and parses one manifest.
pub(crate) async fn read_manifest(bucket: &Bucket, key: &str) -> Option<Manifest> {
    let object = bucket.get(key.to_string()).execute().await.ok()??;
    let bytes = object.body()?.bytes().await.ok()?;
    serde_json::from_slice(&bytes).ok()
}
