//! Performs a restore's R2 work (the decisions are in `crate::restore`): reads the backup's
//! manifest, stages a rewritten D1 dump one bounded step at a time (a ranged read, the pure
//! rewriter, one chunk written), deletes the staged chunks, writes a drill's record.
//!
//! The staged dump is never held whole: its chunks go to D1's upload URL as one `PUT` through a
//! `FixedLengthStream` of the known total (`restore/pieces.rs`), so the upload carries a
//! `Content-Length` and its bytes pass through the runtime's streams, never through wasm memory.

use std::time::Duration;

use futures_util::StreamExt;
use md5::Digest;
use worker::{Bucket, Range};

mod pieces;

use super::{net, store};
use crate::error::StepError;
use crate::restore::d1_sql::Staging;
use crate::restore::{Io, IoDone};
use crate::secret::Secret;

/// How long reading a whole dump back may take (an alarm invocation runs at most 15 minutes).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(14 * 60);
/// How long one staging step may take.
const STAGE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long reading a manifest or writing a record may take.
const R2_TIMEOUT: Duration = Duration::from_secs(120);

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
        Io::Digest { key, from, step_bytes, sealed: Some((cipher_size, plain_size)), identity } => {
            let work = async {
                let opener = Opener::new(bucket, &key, cipher_size, identity.as_ref()).await?;
                sealed_digest(&opener, from, step_bytes, plain_size).await
            };
            match net::within(UPLOAD_TIMEOUT, work).await {
                Some(result) => result,
                None => Err(StepError::transient(format!(
                    "reading the encrypted dump back from R2 did not finish within {} min",
                    UPLOAD_TIMEOUT.as_secs() / 60
                ))),
            }
        }
        Io::Digest { key, from, step_bytes, sealed: None, .. } => {
            match net::within(UPLOAD_TIMEOUT, digest(bucket, &key, from, step_bytes)).await {
                Some(result) => result,
                None => Err(StepError::transient(format!(
                    "reading the dump back from R2 did not finish within {} min",
                    UPLOAD_TIMEOUT.as_secs() / 60
                ))),
            }
        }
        Io::Record { key, record } => match net::within(R2_TIMEOUT, store::put_json(bucket, &key, &record)).await {
            Some(Ok(())) => Ok(IoDone::Recorded),
            Some(Err(e)) => Err(StepError::transient(e)),
            None => Err(StepError::transient("writing the drill's record timed out")),
        },
        Io::GraphLoad(_) => Err(StepError::permanent("internal: a graph load is performed by graph_load::run")),
        Io::PostPieces { request, pieces } => pieces::post(bucket, request, pieces).await,
        Io::Stage { staging, step_bytes, identity } => {
            match net::within(STAGE_TIMEOUT, stage(bucket, *staging, step_bytes, identity.as_ref())).await {
                Some(result) => result,
                None => Err(StepError::transient("a step staging the dump did not finish within 5 min")),
            }
        }
        Io::DeleteObjects { keys } => {
            let work = async {
                // R2 deletes at most 1,000 keys per call: one subrequest per 1,000 chunks.
                for batch in keys.chunks(1000) {
                    bucket.delete_multiple(batch.to_vec()).await.map_err(|e| transient("R2 delete", e))?;
                }
                Ok(IoDone::Deleted)
            };
            net::within(R2_TIMEOUT, work)
                .await
                .unwrap_or_else(|| Err(StepError::transient("deleting the staged import timed out")))
        }
    }
}

/// One step of the MD5 of the R2 object `key`: from `from.offset`, at most `step_bytes` (and
/// less once the invocation nears its CPU limit), streamed; the MD5 and size once the object
/// ends, else how far it got.
async fn digest(
    bucket: &Bucket,
    key: &str,
    from: crate::dump::Md5Progress,
    step_bytes: u64,
) -> Result<IoDone, StepError> {
    let mut md5 = from.resume().ok_or_else(|| StepError::permanent("the saved MD5 state of the drill is corrupt"))?;
    let mut get = bucket.get(key.to_string());
    if from.offset > 0 {
        get = get.range(Range::OffsetWithLength { offset: from.offset, length: step_bytes });
    }
    let object = get
        .execute()
        .await
        .map_err(|e| transient("R2 get", e))?
        .ok_or_else(|| StepError::permanent(format!("the dump {key} is missing from R2")))?;
    let total = object.size();
    let body = object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {key}")))?;
    let mut stream = body.stream().map_err(|e| transient("R2 read", e))?;
    let mut size = from.offset;
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| transient("R2 read", e))?;
        let take = chunk.len().min(usize::try_from(step_bytes - read).unwrap_or(usize::MAX));
        let before = size;
        md5.update(&chunk[..take]);
        size += take as u64;
        read += take as u64;
        if size >= total {
            break;
        }
        if read >= step_bytes || worker::signal::is_near_cpu_limit() {
            // The rest in the next step (a fresh invocation), from here.
            return Ok(IoDone::DigestPart(crate::dump::Md5Progress::after(&md5, size)));
        }
        super::transfer::yield_now_and_then(before, size).await;
    }
    if size != total {
        return Err(StepError::transient(format!("R2 ended the read of {key} at byte {size} of {total}")));
    }
    Ok(IoDone::Digest { md5: hex::encode(md5.finalize()), size })
}

/// One staging step: the range the staging asks for, rewritten, and its chunk written (a
/// repeated step writes the same chunk to the same key).
async fn stage(
    bucket: &Bucket,
    mut staging: Staging,
    step_bytes: u64,
    identity: Option<&Secret>,
) -> Result<IoDone, StepError> {
    let sealed = staging.inputs.get(staging.input).and_then(|i| i.sealed);
    let data = match staging.next_read(step_bytes) {
        Some((_, _, 0)) => Some(Vec::new()),
        Some((key, offset, length)) if sealed.is_some() => {
            let opener = Opener::new(bucket, &key, sealed.unwrap_or_default(), identity).await?;
            Some(opener.read(offset, length).await?)
        }
        Some((key, offset, length)) => Some(read_range(bucket, &key, offset, length).await?),
        None => None,
    };
    let out = staging.step(data.as_deref(), step_bytes).map_err(|e| StepError::permanent(e.to_string()))?;
    if !out.chunk.is_empty() {
        let key = staging.chunk_key(staging.chunks.len().saturating_sub(1));
        bucket.put(key.clone(), out.chunk).execute().await.map_err(|e| transient(&format!("R2 put {key}"), e))?;
    }
    Ok(IoDone::Staged(Box::new(staging)))
}

/// An encrypted (age) object of R2, opened with the source's identity: its header read and its
/// payload key derived, so that any range of its plaintext can be read
/// ([`crate::encryption::window`]), each chunk authenticated as it is opened.
pub(super) struct Opener<'a> {
    bucket: &'a Bucket,
    key: &'a str,
    size: u64,
    header_len: u64,
    payload_key: crate::encryption::PayloadKey,
}

impl<'a> Opener<'a> {
    pub(super) async fn new(
        bucket: &'a Bucket,
        key: &'a str,
        size: u64,
        identity: Option<&Secret>,
    ) -> Result<Self, StepError> {
        use crate::encryption::{Decryptor, Identity, MAX_HEADER_LEN};
        let identity = identity.ok_or_else(|| {
            StepError::permanent(format!("{key} is encrypted and the source names no age_identity_secret to read it"))
        })?;
        let identities = Identity::parse_key_file(identity.expose())
            .map_err(|e| StepError::permanent(format!("the source's age identity does not read: {e}")))?;
        let mut asked = 4096u64.min(size);
        loop {
            let start = read_range(bucket, key, 0, asked).await?;
            let opened = Decryptor::open(&identities, &start).map_err(|e| {
                StepError::permanent(format!("{key} does not open with the source's age identity: {e}"))
            })?;
            if let Some(d) = opened {
                return Ok(Self {
                    bucket,
                    key,
                    size,
                    header_len: d.header_len(),
                    payload_key: d.payload_key().clone(),
                });
            }
            if asked >= size || asked as usize >= MAX_HEADER_LEN + 64 {
                return Err(StepError::permanent(format!("{key} has no complete age header")));
            }
            asked = (asked * 4).min(size);
        }
    }

    /// Plaintext bytes `[from, from + len)` (fewer at the end).
    pub(super) async fn read(&self, from: u64, len: u64) -> Result<Vec<u8>, StepError> {
        let bad = |e: crate::encryption::AgeError| StepError::permanent(format!("{}: {e}", self.key));
        let window = crate::encryption::window(self.header_len, self.size, from, len).map_err(bad)?;
        if window.take == 0 {
            return Ok(Vec::new());
        }
        let bytes = read_range(self.bucket, self.key, window.cipher_from, window.cipher_len).await?;
        crate::encryption::read_window(&self.payload_key, self.header_len, &window, &bytes).map_err(bad)
    }
}

/// Bytes `[offset, offset + length)` of an R2 object.
async fn read_range(bucket: &Bucket, key: &str, offset: u64, length: u64) -> Result<Vec<u8>, StepError> {
    let object = bucket
        .get(key.to_string())
        .range(Range::OffsetWithLength { offset, length })
        .execute()
        .await
        .map_err(|e| transient("R2 get", e))?
        .ok_or_else(|| StepError::permanent(format!("{key} is missing from R2")))?;
    let body = object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {key}")))?;
    body.bytes().await.map_err(|e| transient("R2 read", e))
}

/// One step of the MD5 of an encrypted dump's plaintext, as [`digest`] does for a plain one.
async fn sealed_digest(
    opener: &Opener<'_>,
    from: crate::dump::Md5Progress,
    step_bytes: u64,
    total: u64,
) -> Result<IoDone, StepError> {
    let mut md5 = from.resume().ok_or_else(|| StepError::permanent("the saved MD5 state of the drill is corrupt"))?;
    let plain = opener.read(from.offset, step_bytes).await?;
    md5.update(&plain);
    let size = from.offset + plain.len() as u64;
    if size < total && !plain.is_empty() {
        return Ok(IoDone::DigestPart(crate::dump::Md5Progress::after(&md5, size)));
    }
    if size != total {
        return Err(StepError::permanent(format!("{} holds {size} plaintext bytes, not {total}", opener.key)));
    }
    Ok(IoDone::Digest { md5: hex::encode(md5.finalize()), size })
}
