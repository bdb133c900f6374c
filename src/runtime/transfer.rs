//! Performs one slice of a copy (the decisions are in `crate::transfer`).
//!
//! A slice downloads from the persisted offset (`Range`/`If-Range`) and uploads up to
//! `parts_in_flight` parts while the next one downloads. Parts live in JS memory: the body is read
//! with a BYOB reader (`readAtLeast`, about 1 MiB at a time) straight into the part's
//! `Uint8Array`, so a read never crosses a part boundary; each read is copied once into the copy's
//! own wasm buffer and hashed in the same synchronous call (`crate::transfer::Digests`: no other
//! copy in the isolate can touch those bytes, nothing runs between the copy and the hash), and the part goes to R2 and to Web Crypto (its own
//! SHA-256, native code) without ever being copied back out of wasm. The slice stops at a part
//! boundary when its byte or time budget is used (or the runtime says the CPU budget is nearly
//! spent); the next alarm runs the next slice.
//!
//! The Aura graph export and D1's query artifact are generated, not downloaded: each slice reads
//! pages from the saved cursor (a graph slice ends one gzip member). Bytes that do not fill a
//! part are parked in a small R2 object (`<key>.tail-<slice>`) and read back by the next slice.
//!
//! When the copy's state is saved is one rule of the core (`crate::transfer::ResumePoints`): at
//! the copy's resume points only, where parts, offset, hash state and (for a generated file)
//! cursor and tail agree: every settled part of a download or a replica, a slice's end for a
//! generated file. This shell has no rule of its own: at each moment it reaches (upload created,
//! part settled, restart, slice paused, file finished, slice failed) it asks
//! `ResumePoints::save_at` what to write and writes it ([`Sink::save_at`]), and a failed slice
//! leaves the state `ResumePoints::after_failure` gives.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};

use sha2::Digest as _;
use std::time::Duration;

use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use worker::{Bucket, Storage};

use super::objects::{call, js_text, promise, start_digest, Objects};
use super::{net, store};
use crate::dump::{Tally, TallyState};
use crate::error::StepError;
use crate::http::{status_error, HttpRequest, HttpResponse};
use crate::job::{CopySource, Event, Job, SliceOrder, SliceOutcome};
use crate::manifest::Artifact;
use crate::sweep::{Leftover, OpenUpload};
use crate::transfer::{
    load_hasher, CopyState, Digests, Generator, Moment, PartRecord, Resume, ResumePoints, Save, TransferSettings,
};

/// Bytes hashed between two yields to the event loop, so status requests are answered mid-copy.
const YIELD_EVERY: u64 = 4 << 20;

/// Yields to the event loop when a count of bytes handled (copied or read back) went from
/// `before` to `after` past a multiple of [`YIELD_EVERY`].
pub(super) async fn yield_now_and_then(before: u64, after: u64) {
    if before / YIELD_EVERY != after / YIELD_EVERY {
        worker::Delay::from(Duration::ZERO).await;
    }
}
/// Bytes one read asks for at least (less only at a part's end or the body's end).
const READ_AT_LEAST: usize = 1 << 20;

pub(super) fn r2_err(what: &str, e: impl std::fmt::Display) -> StepError {
    StepError::transient(format!("R2 {what} failed: {e}"))
}

/// A part handed to R2 whose upload has not been confirmed yet.
struct InFlight {
    number: u16,
    size: u64,
    hash_after: String,
    tally_after: Option<TallyState>,
    upload: JsFuture,
    digest: JsFuture,
}

/// Where a slice's bytes go: the whole-file hash, the part being filled, the parts in flight, and
/// the copy's state (saved with the job at its resume points).
struct Sink<'a> {
    bucket: &'a Objects,
    storage: &'a Storage,
    job: &'a mut Job,
    state: CopyState,
    settings: TransferSettings,
    filename: String,
    content_type: String,
    /// The whole file's SHA-256, a SQL dump's MD5 and row tally, the gzip check: this copy's
    /// own, fed synchronously as bytes arrive (see `Digests`).
    digests: Digests,
    /// The part being filled (JS memory, `part_size` long) and how much of it is.
    part: Uint8Array,
    filled: usize,
    inflight: VecDeque<InFlight>,
    /// The job's JSON, rewritten in place at every write.
    json: Vec<u8>,
    /// Records of parts settled since the last write.
    pending_parts: Vec<PartRecord>,
    /// The record of a multipart upload just created, written with the next write (the core
    /// saves at the upload's creation, before any part is sent).
    pending_upload: Option<OpenUpload>,
    /// When the copy's state is saved: the core's rule for this copy's source.
    points: ResumePoints,
    /// Bytes taken in this slice.
    pushed: u64,
    started_ms: f64,
    /// How long the runtime lets this slice run: raised to the invocation's ceiling once the copy
    /// turns out unable to resume (`TransferSettings::slice_limit`).
    limit: &'a Cell<Duration>,
}

impl<'a> Sink<'a> {
    fn part_size(&self) -> usize {
        self.settings.part_size as usize
    }

    fn budget_used(&self) -> bool {
        let elapsed = Duration::from_millis((js_sys::Date::now() - self.started_ms).max(0.0) as u64);
        self.settings.slice_done(self.pushed, elapsed) || worker::signal::is_near_cpu_limit()
    }

    /// Writes what the core's rule says the copy saves at `moment`: nothing, the pending
    /// records, or the pending records then the job with the copy's state (a resume point).
    async fn save_at(&mut self, moment: Moment) -> Result<(), StepError> {
        match self.points.save_at(moment) {
            Save::Nothing => Ok(()),
            Save::Records => self.write_progress(false).await,
            Save::RecordsAndState => self.write_progress(true).await,
        }
    }

    /// Writes the pending records (parts settled, an upload just created), and the job with the
    /// copy's current state when `with_job`. The job in memory keeps the state the slice was
    /// ordered with; the state machine gets the new one in the `Sliced` event.
    ///
    /// The state is moved into the job for serialization (not cloned) and the JSON is written
    /// into one reused buffer: the record grows with every part, and wasm memory must not.
    /// The records go in the same write, each under its own key, before the job, so the job's
    /// record stays small however many parts there are.
    async fn write_progress(&mut self, with_job: bool) -> Result<(), StepError> {
        let placeholder = CopyState::new(String::new(), self.state.file, self.state.started_at);
        let Some(copying) = self.job.copying_mut() else {
            return Err(StepError::permanent("only an export or a replicate job copies files"));
        };
        let state = std::mem::replace(&mut self.state, placeholder);
        let ordered = copying.copy.replace(state);
        self.json.clear();
        let written = serde_json::to_writer(&mut self.json, &*self.job);
        if let Some(copying) = self.job.copying_mut() {
            if let Some(state) = std::mem::replace(&mut copying.copy, ordered) {
                self.state = state;
            }
        }
        written.map_err(|e| StepError::permanent(e.to_string()))?;
        let text = std::str::from_utf8(&self.json).map_err(|e| StepError::permanent(e.to_string()))?;
        let mut records = Vec::with_capacity(self.pending_parts.len() + 1);
        for part in &self.pending_parts {
            let record = serde_json::to_string(part).map_err(|e| StepError::permanent(e.to_string()))?;
            records.push((self.state.part_key(self.job.id.as_str(), part.number), record));
        }
        if let Some(upload) = &self.pending_upload {
            records.push(store::upload_entry(upload).map_err(StepError::permanent)?);
        }
        let job = with_job.then(|| (store::job_key(&self.job.id), text.to_string()));
        // A copy saved at its slice's end writes all of the slice's records: more than one call
        // may take.
        let batches = crate::transfer::progress_batches(records, job);
        store::put_batches(self.storage, batches).await.map_err(|e| r2_err("saving the copy's progress", e))?;
        self.pending_parts.clear();
        self.pending_upload = None;
        Ok(())
    }

    /// Every part record of this copy, checked to add up, for completing the upload.
    async fn part_records(&self) -> Result<Vec<PartRecord>, StepError> {
        let prefix = self.state.part_prefix(self.job.id.as_str());
        let entries =
            store::list_texts(self.storage, &prefix).await.map_err(|e| r2_err("reading the part records", e))?;
        // Records past the stored count are leftovers of a slice whose state was not saved (a
        // generated file's failed or cut-off slice); the parts that count were written again
        // under the same keys.
        let records: Vec<PartRecord> = entries
            .iter()
            .take(self.state.parts_stored as usize)
            .map(|(_, text)| serde_json::from_str(text))
            .collect::<Result<_, _>>()
            .map_err(|e| StepError::permanent(format!("a part record is unreadable: {e}")))?;
        self.state.check_parts(&records)?;
        Ok(records)
    }

    /// Takes bytes produced in wasm (the graph export); uploads a part each time one is full.
    async fn push(&mut self, mut data: &[u8]) -> Result<(), StepError> {
        while !data.is_empty() {
            let take = (self.part_size() - self.filled).min(data.len());
            self.digests.absorb(&data[..take]).map_err(StepError::permanent)?;
            self.part.subarray(self.filled as u32, (self.filled + take) as u32).copy_from(&data[..take]);
            self.filled += take;
            data = &data[take..];
            self.took(take as u64).await;
            if self.filled == self.part_size() {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// Accounts for `n` bytes taken in this slice, yielding to the event loop now and then.
    async fn took(&mut self, n: u64) {
        let before = self.pushed;
        self.pushed += n;
        yield_now_and_then(before, self.pushed).await;
    }

    /// Starts a new, empty part buffer (the previous one was sent, or handed to a reader).
    fn fresh_part(&mut self) {
        self.part = Uint8Array::new_with_length(self.settings.part_size as u32);
        self.filled = 0;
    }

    /// The bytes of the part being filled, copied into wasm (small files and the graph's tail).
    fn filled_bytes(&self) -> Vec<u8> {
        self.part.subarray(0, self.filled as u32).to_vec()
    }

    /// Bytes of the artifact taken so far (stored, in flight, buffered).
    fn position(&self) -> u64 {
        self.state.offset + self.inflight.iter().map(|p| p.size).sum::<u64>() + self.filled as u64
    }

    fn metadata(&self, sha256: Option<&str>) -> HashMap<String, String> {
        let mut m = HashMap::from([
            ("job_id".to_string(), self.job.id.to_string()),
            ("filename".to_string(), self.filename.clone()),
        ]);
        if let Some(s) = sha256 {
            m.insert("sha256".into(), s.to_string());
        }
        m
    }

    /// The multipart upload, created on first use. Its id is saved at once, before any part is
    /// sent, both in the copy's state and in the source's list of open uploads (which the daily
    /// sweep reads), so it can always be aborted. R2 cannot list open uploads: only a kill between
    /// the creation and this one write can lose an id, and R2's default lifecycle rule aborts
    /// such an upload after seven days.
    async fn ensure_upload(&mut self) -> Result<String, StepError> {
        if let Some(id) = &self.state.upload_id {
            return Ok(id.clone());
        }
        let id = self.bucket.create_upload(&self.state.key, &self.content_type, &self.metadata(None)).await?;
        self.state.upload_id = Some(id.clone());
        self.pending_upload = Some(OpenUpload {
            key: self.state.key.clone(),
            upload_id: id.clone(),
            job_id: self.job.id.to_string(),
            created_at: super::now(),
            bucket: self.job.replica().map(|r| r.binding.clone()),
        });
        self.save_at(Moment::UploadCreated).await?;
        Ok(id)
    }

    /// Hands the filled part to R2 as the next part; waits while too many are in flight.
    async fn send_part(&mut self) -> Result<(), StepError> {
        let number = self.state.next_part_number() + self.inflight.len() as u32;
        self.state.check_part_limit(number, &self.filename, self.settings.part_size)?;
        let upload_id = self.ensure_upload().await?;
        let bytes = self.part.subarray(0, self.filled as u32);
        let size = self.filled as u64;
        self.fresh_part();
        let digest = start_digest(&bytes).map_err(|e| StepError::transient(format!("hashing a part failed: {e}")))?;
        let upload = self.bucket.start_part(&self.state.key, &upload_id, number as u16, &bytes, &digest)?;
        let digest = JsFuture::from(digest);
        self.inflight.push_back(InFlight {
            number: number as u16,
            size,
            hash_after: self.digests.saved_hasher(),
            tally_after: self.digests.saved_tally(),
            upload,
            digest,
        });
        while self.inflight.len() > self.settings.parts_in_flight as usize {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Waits for the oldest part in flight and records it.
    async fn settle_one(&mut self) -> Result<(), StepError> {
        let Some(part) = self.inflight.pop_front() else { return Ok(()) };
        let etag = Objects::part_answer(part.number, part.upload.await)?;
        let digest =
            part.digest.await.map_err(|e| StepError::transient(format!("hashing a part failed: {}", js_text(&e))))?;
        let sha256 = hex::encode(Uint8Array::new(&digest).to_vec());
        let record = PartRecord { number: part.number, etag, size: part.size, sha256 };
        self.state.record_part(&record, part.hash_after);
        if part.tally_after.is_some() {
            self.state.tally = part.tally_after;
        }
        self.pending_parts.push(record);
        self.save_at(Moment::PartSettled).await
    }

    async fn settle_all(&mut self) -> Result<(), StepError> {
        while !self.inflight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Goes back to byte 0: aborts the upload, resets the hash, saves. Fails for good when the
    /// source made the copy restart too often.
    async fn restart(&mut self, reason: String) -> Result<(), StepError> {
        self.inflight.clear();
        self.pending_parts.clear();
        self.filled = 0;
        if let Some(id) = self.state.restart(reason.clone()) {
            // A failed abort keeps the upload's record: the sweep aborts it once this job ends.
            if let Err(e) =
                store::abort_upload(self.bucket, self.storage, self.job.id.as_str(), &self.state.key, &id).await
            {
                worker::console_error!("job {}: {e}; left for the daily sweep", self.job.id);
            }
        }
        self.digests.reset();
        worker::console_log!("job {}: {}: restarting from byte 0: {reason}", self.job.id, self.filename);
        self.save_at(Moment::Restarted).await?;
        if self.state.restarts > self.settings.max_restarts {
            return Err(StepError::permanent(format!(
                "the copy of {} had to restart from zero more than {} times; last: {reason}",
                self.filename, self.settings.max_restarts
            )));
        }
        Ok(())
    }

    /// Stores what is left and completes the object at its key.
    async fn finish(&mut self, details: Option<serde_json::Value>) -> Result<Artifact, StepError> {
        if self.position() == 0 {
            return Err(StepError::permanent(format!("{} is empty (0 bytes); nothing was stored", self.filename)));
        }
        let digest = self.digests.sha256();
        let sha256 = hex::encode(digest);
        if self.state.upload_id.is_none() {
            // It never filled a part: one put, checked by R2 against the SHA-256.
            let size = self.filled as u64;
            let body = self.filled_bytes();
            self.filled = 0;
            let stored = self
                .bucket
                .put(&self.state.key, body, &self.content_type, &self.metadata(Some(&sha256)), digest)
                .await?;
            if stored != size {
                return Err(StepError::transient(format!(
                    "{stored} bytes of {size} were stored for {}",
                    self.filename
                )));
            }
            self.state.offset = size;
            return Ok(self.artifact(sha256, 1, Vec::new(), details));
        }
        if self.filled > 0 || (self.state.parts_stored == 0 && self.inflight.is_empty()) {
            self.send_part().await?;
        }
        self.settle_all().await?;
        // Completing reads the part records back: they are stored now (a generated file's state
        // stays at its slice's start, so a completion cut off goes on from there).
        self.save_at(Moment::FileFinished).await?;
        let Some(id) = self.state.upload_id.clone() else {
            return Err(StepError::permanent("the multipart upload vanished"));
        };
        let records = self.part_records().await?;
        let parts: Vec<(u16, String)> = records.iter().map(|p| (p.number, p.etag.clone())).collect();
        let stored = self.bucket.complete(&self.state.key, &id, parts, self.state.offset).await?;
        store::forget_upload(self.storage, self.job.id.as_str(), &id).await;
        if stored != self.state.offset {
            return Err(StepError::transient(format!(
                "{stored} bytes of {} were stored for {}",
                self.state.offset, self.filename
            )));
        }
        let hashes = records.into_iter().map(|p| p.sha256).collect::<Vec<_>>();
        Ok(self.artifact(sha256, self.state.parts_stored, hashes, details))
    }

    fn artifact(
        &self,
        sha256: String,
        parts: u32,
        part_sha256: Vec<String>,
        details: Option<serde_json::Value>,
    ) -> Artifact {
        let (md5, row_counts) = self.digests.tally().unzip();
        Artifact {
            md5,
            row_counts,
            key: self.state.key.clone(),
            filename: self.filename.clone(),
            size: self.state.offset,
            sha256,
            content_type: self.content_type.clone(),
            parts,
            part_sha256,
            details,
        }
    }
}

/// Runs one slice of `order` into `bucket` and returns the event that reports it. `primary` is
/// where a replica's bytes are read from (`CopySource::R2`).
pub(crate) async fn run_slice(
    bucket: &Objects,
    primary: &Bucket,
    storage: &Storage,
    job: &mut Job,
    order: SliceOrder,
    limit: &Cell<Duration>,
) -> Event {
    let SliceOrder { source, state, filename, content_type, settings } = order;
    let hasher = match load_hasher(&state.hash_state) {
        Ok(h) => h,
        Err(e) => return Event::Sliced { state, outcome: SliceOutcome::Failed(e) },
    };
    let mut state = state;
    if state.tally.is_none() && state.offset == 0 && Tally::applies_to(&filename) {
        state.tally = Some(TallyState::fresh());
    }
    let tally = match state.tally.as_ref().map(Tally::load) {
        None => None,
        Some(Some(t)) => Some(t),
        Some(None) => {
            let e = StepError::permanent("the copy's saved MD5 and row counts are corrupt; the copy cannot resume");
            return Event::Sliced { state, outcome: SliceOutcome::Failed(e) };
        }
    };
    let at_start = state.clone();
    let points = source.resume_points();
    let mut sink = Sink {
        bucket,
        storage,
        job,
        state,
        settings,
        filename,
        content_type,
        digests: Digests::new(hasher, tally),
        part: Uint8Array::new_with_length(settings.part_size as u32),
        filled: 0,
        inflight: VecDeque::new(),
        json: Vec::new(),
        pending_parts: Vec::new(),
        pending_upload: None,
        points,
        pushed: 0,
        started_ms: js_sys::Date::now(),
        limit,
    };
    let result = match &source {
        CopySource::Http(request) => http_slice(&mut sink, request).await,
        CopySource::Graph(spec) => match sink.state.cursor_as() {
            Ok(cursor) => generated_slice(&mut sink, Box::new(spec.resume(cursor.as_ref()))).await,
            Err(e) => Err(e),
        },
        CopySource::D1Query(spec) => match sink.state.cursor_as() {
            Ok(cursor) => generated_slice(&mut sink, Box::new(spec.resume(cursor.as_ref()))).await,
            Err(e) => Err(e),
        },
        CopySource::R2 { key, size } => r2_slice(&mut sink, primary, key, *size).await,
        CopySource::Sealed { plain, recipients, tally } => {
            match sealed_source(&sink.state, plain, recipients, *tally) {
                Ok(writer) => generated_slice(&mut sink, writer).await,
                Err(e) => Err(e),
            }
        }
    };
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            if points.settles_parts_after_failure() {
                // Keep every part R2 confirmed, so the retry resumes after them.
                while let Some(part) = sink.inflight.front() {
                    let number = part.number;
                    if sink.settle_one().await.is_err() {
                        worker::console_log!("part {number} did not complete; the retry uploads it again");
                        break;
                    }
                }
            }
            sink.inflight.clear();
            let _ = sink.save_at(Moment::SliceFailed).await;
            sink.state = points.after_failure(at_start, sink.state);
            SliceOutcome::Failed(e)
        }
    };
    Event::Sliced { state: sink.state, outcome }
}

/// The generator of an encrypted copy's slice: resumed from its cursor, or (the first slice) a
/// new age file whose keys come from the platform's random source.
fn sealed_source(
    state: &CopyState,
    plain: &CopySource,
    recipients: &[crate::encryption::Recipient],
    tally: bool,
) -> Result<Box<dyn Generator>, StepError> {
    use crate::transfer::sealed::{self, Plain, SealCursor, Sealed};
    let cursor: Option<SealCursor> = state.cursor_as()?;
    let inner = cursor.as_ref().and_then(|c| c.inner.as_ref());
    let plain = match plain {
        CopySource::Http(request) => Plain::Download(request.clone()),
        CopySource::Graph(spec) => Plain::Generated(Box::new(spec.resume(state.read_cursor(inner)?.as_ref()))),
        CopySource::D1Query(spec) => Plain::Generated(Box::new(spec.resume(state.read_cursor(inner)?.as_ref()))),
        CopySource::R2 { .. } | CopySource::Sealed { .. } => {
            return Err(StepError::permanent("only a provider's files are encrypted"))
        }
    };
    let envelope = match cursor {
        Some(_) => None,
        None => {
            let mut random = vec![0u8; sealed::random_len(recipients.len())];
            getrandom::fill(&mut random)
                .map_err(|e| StepError::transient(format!("no random bytes for the file's keys: {e}")))?;
            Some(sealed::envelope(recipients, &random)?)
        }
    };
    // The provider's file name: the object's name without `.age`.
    let name = state.key.rsplit('/').next().unwrap_or_default();
    let name = name.strip_suffix(sealed::SUFFIX).unwrap_or(name);
    Ok(Box::new(Sealed::new(plain, envelope.as_ref(), cursor, tally)?.checking_start(name)))
}

/// One slice of a download: from the persisted offset to the budget or the end.
async fn http_slice(sink: &mut Sink<'_>, base: &HttpRequest) -> Result<SliceOutcome, StepError> {
    // A URL that carries no credentials of ours is a signed URL, which can expire.
    let signed = base.header_value("authorization").is_none() && base.headers.iter().all(|(k, _)| !k.contains("auth"));
    // A restart whose answer cannot be used asks once more, from zero.
    for _ in 0..2 {
        if sink.state.all_stored() {
            return sink.finish(None).await.map(SliceOutcome::Finished);
        }
        let request = sink.state.range_request(base.clone());
        let (mut resp, controller) =
            net::send_abortable(&request, net::HEADERS_TIMEOUT).await.map_err(StepError::transient)?;
        let status = resp.status_code();
        let headers = net::header_pairs(&resp);
        let offset = sink.state.offset;
        if status == 416 && offset > 0 {
            controller.abort();
            match sink.state.check_unsatisfiable(&headers) {
                // Every byte was stored before the last slice was cut off.
                Ok(()) => return sink.finish(None).await.map(SliceOutcome::Finished),
                Err(reason) => sink.restart(reason).await?,
            }
            continue;
        }
        if !(200..300).contains(&status) {
            let mut stream = resp.stream().map_err(|e| StepError::transient(e.to_string()))?;
            let first = net::next_chunk(&mut stream, net::IDLE_TIMEOUT).await.ok().flatten().unwrap_or_default();
            controller.abort();
            let text: String = String::from_utf8_lossy(&first).chars().take(200).collect();
            let message = format!("download of {} was refused (HTTP {status}): {}", sink.filename, text.trim());
            if signed && crate::transfer::signed_url_expired(status, &text) {
                return Ok(SliceOutcome::UrlExpired(message));
            }
            let http = HttpResponse { status, headers, body: Vec::new() };
            return Err(status_error(&http, super::now(), message));
        }
        match sink.state.check_response(status, &headers) {
            Resume::Continue => {}
            Resume::Refuse(reason) => {
                controller.abort();
                return Err(StepError::permanent(format!("download of {}: {reason}", sink.filename)));
            }
            Resume::StartOver { reason, body_from_zero } => {
                sink.restart(reason).await?;
                if !body_from_zero {
                    controller.abort();
                    continue;
                }
                sink.state.check_response(status, &headers);
            }
        }
        // A copy that cannot resume runs to its end: it gets the invocation's whole wall clock.
        sink.limit.set(sink.settings.slice_limit(sink.state.no_ranges));
        let reader =
            ByobReader::of(&resp).map_err(|e| StepError::transient(format!("reading {}: {e}", sink.filename)))?;
        return pump(sink, reader, controller).await;
    }
    Err(StepError::transient(format!("the source of {} kept answering with ranges that do not fit", sink.filename)))
}

/// A BYOB reader of a response body: each read fills the given view (at least
/// [`READ_AT_LEAST`] bytes, or the view, or what is left) with no copy through wasm.
struct ByobReader {
    reader: JsValue,
    at_least: bool,
}

impl ByobReader {
    fn of(resp: &worker::Response) -> Result<Self, String> {
        let worker::ResponseBody::Stream(stream) = resp.body() else {
            return Err("the response has no body stream".into());
        };
        let options = js_sys::Object::new();
        Reflect::set(&options, &JsValue::from_str("mode"), &JsValue::from_str("byob")).map_err(|e| js_text(&e))?;
        let reader = call(stream.as_ref(), "getReader", &[&options])?;
        let at_least = Reflect::get(&reader, &JsValue::from_str("readAtLeast")).is_ok_and(|f| f.is_function());
        Ok(Self { reader, at_least })
    }

    /// Stops the download: the rest of the body is not wanted.
    fn cancel(&self) {
        // `cancel()` returns a promise that settles once the stream is torn down; nothing waits for it.
        let _ = call(&self.reader, "cancel", &[]);
    }

    /// Starts reading into `view` (filled completely unless the body ends first).
    fn start(&self, view: &Uint8Array) -> Result<JsFuture, String> {
        let reading = if self.at_least {
            call(&self.reader, "readAtLeast", &[&JsValue::from_f64(f64::from(view.length())), view])?
        } else {
            call(&self.reader, "read", &[view])?
        };
        promise(reading)
    }

    /// Waits for a started read; returns the filled view (over the same, transferred, buffer)
    /// and whether the body ended. Fails when nothing arrives within the idle timeout.
    async fn wait(reading: JsFuture, idle: &mut IdleTimer) -> Result<(Option<Uint8Array>, bool), String> {
        let mut reading = Box::pin(reading);
        let result = loop {
            match futures_util::future::select(reading.as_mut(), idle.timer.as_mut()).await {
                futures_util::future::Either::Left((r, _)) => {
                    idle.last_data_ms = js_sys::Date::now();
                    break r.map_err(|e| format!("the connection broke: {}", js_text(&e)))?;
                }
                futures_util::future::Either::Right(_) => idle.rearm()?,
            }
        };
        let done = Reflect::get(&result, &JsValue::from_str("done")).map(|d| d.is_truthy()).unwrap_or(true);
        let value =
            Reflect::get(&result, &JsValue::from_str("value")).ok().and_then(|v| v.dyn_into::<Uint8Array>().ok());
        Ok((value, done))
    }
}

/// The download's idle timeout, as one timer re-armed only when it fires (not one per read).
struct IdleTimer {
    timer: std::pin::Pin<Box<worker::Delay>>,
    last_data_ms: f64,
}

impl IdleTimer {
    fn new() -> Self {
        Self { timer: Box::pin(worker::Delay::from(net::IDLE_TIMEOUT)), last_data_ms: js_sys::Date::now() }
    }

    /// The timer fired: an error when no data came for the whole timeout, else wait the rest.
    fn rearm(&mut self) -> Result<(), String> {
        let quiet = Duration::from_millis((js_sys::Date::now() - self.last_data_ms).max(0.0) as u64);
        if quiet >= net::IDLE_TIMEOUT {
            return Err(format!("no data received for {} s", net::IDLE_TIMEOUT.as_secs()));
        }
        self.timer = Box::pin(worker::Delay::from(net::IDLE_TIMEOUT - quiet));
        Ok(())
    }
}

/// The view of the part that the next read fills: at most [`READ_AT_LEAST`] bytes, never past
/// the part's end.
fn next_view(sink: &Sink<'_>) -> Uint8Array {
    let end = (sink.filled + READ_AT_LEAST).min(sink.part_size());
    sink.part.subarray(sink.filled as u32, end as u32)
}

/// Ends a read that failed: stops the download and starts a fresh part buffer (the old one was
/// handed to the reader).
fn broken(sink: &mut Sink<'_>, reader: &ByobReader, e: String) -> StepError {
    reader.cancel();
    sink.fresh_part();
    StepError::transient(format!("download of {}: {e}", sink.filename))
}

/// Reads a download's body into the sink until it ends or the slice's budget is used.
async fn pump(
    sink: &mut Sink<'_>,
    reader: ByobReader,
    controller: worker::AbortController,
) -> Result<SliceOutcome, StepError> {
    let expected = sink.state.validators.as_ref().and_then(|v| v.length);
    // A source that ignores ranges cannot resume: such a copy runs to the end.
    let may_stop = !sink.state.no_ranges;
    // Without a declared length, a body cut off cleanly would look whole: a gzip file is then
    // checked to its trailer (when it streams from byte 0 to its end in this slice).
    let name = sink.filename.to_ascii_lowercase();
    if expected.is_none() && sink.position() == 0 && (name.ends_with(".gz") || name.ends_with(".tgz")) {
        sink.digests.check_gzip();
    }
    // Keep the fetch's controller alive for the whole read; cancelling the reader ends the fetch.
    let _controller = controller;
    let broke = |sink: &mut Sink<'_>, e: String| broken(sink, &reader, e);
    let mut idle = IdleTimer::new();
    let mut reading = Some(reader.start(&next_view(sink)).map_err(|e| broke(sink, e))?);
    while let Some(pending) = reading.take() {
        let (value, done) = ByobReader::wait(pending, &mut idle).await.map_err(|e| broke(sink, e))?;
        match value {
            // The read transferred the part's buffer; the filled view sits at its old offset.
            Some(filled) => {
                sink.part = Uint8Array::new(&filled.buffer());
                let n = filled.length() as usize;
                if expected.is_some_and(|e| sink.position() + n as u64 > e) {
                    let e = format!("it sent more than the {} bytes it announced", expected.unwrap_or_default());
                    return Err(broke(sink, e));
                }
                if sink.position() == 0 {
                    let first = filled.subarray(0, n.min(64) as u32).to_vec();
                    if let Some(problem) = crate::transfer::wrong_start(&sink.filename, &first) {
                        reader.cancel();
                        return Err(StepError::permanent(problem));
                    }
                }
                // Hashed now, into this copy's own digests, before anything can run in between.
                sink.digests
                    .absorb_with(n, |staged| filled.subarray(0, n as u32).copy_to(staged))
                    .map_err(|e| damaged(sink, &reader, e))?;
                sink.filled += n;
                sink.took(n as u64).await;
            }
            None if sink.filled == 0 => sink.fresh_part(),
            None => return Err(broke(sink, "the reader returned no buffer".into())),
        }
        let boundary = sink.filled == sink.part_size();
        if boundary {
            sink.send_part().await?;
            if may_stop && !done && sink.budget_used() {
                reader.cancel();
                sink.settle_all().await?;
                sink.save_at(Moment::SlicePaused).await?;
                return Ok(SliceOutcome::Paused);
            }
        }
        if done {
            break;
        }
        reading = Some(reader.start(&next_view(sink)).map_err(|e| broke(sink, e))?);
    }
    let got = sink.position();
    if let Some(expected) = expected {
        if got != expected {
            return Err(StepError::transient(format!(
                "download of {} ended after {got} of {expected} bytes",
                sink.filename
            )));
        }
    }
    if let Some(check) = sink.digests.take_gzip() {
        check
            .finish()
            .map_err(|e| StepError::permanent(format!("download of {} {e}; nothing was committed", sink.filename)))?;
    }
    sink.finish(None).await.map(SliceOutcome::Finished)
}

/// A file that is not what it must be: the reader is cancelled and the job fails, naming why.
fn damaged(sink: &Sink<'_>, reader: &ByobReader, e: String) -> StepError {
    reader.cancel();
    StepError::permanent(format!("download of {} {e}; nothing was committed", sink.filename))
}

/// One slice of a generated file (the Aura graph export, one gzip member; D1's query artifact):
/// pages from the cursor.
async fn generated_slice(sink: &mut Sink<'_>, mut writer: Box<dyn Generator>) -> Result<SliceOutcome, StepError> {
    let old_tail = sink.state.tail.clone();
    if let Some((key, len)) = &old_tail {
        let bytes = sink.bucket.get(key).await?.ok_or_else(|| {
            StepError::permanent(format!("the export's tail {key} is missing; the copy cannot resume"))
        })?;
        if bytes.len() as u64 != *len {
            return Err(StepError::permanent(format!("the export's tail {key} has {} bytes, not {len}", bytes.len())));
        }
        sink.push(&bytes).await?;
    }
    let mut pages = 0u32;
    let mut more = false;
    let mut expired = None;
    while let Some(request) = writer.next_request() {
        if pages > 0 && (pages >= sink.settings.slice_pages || sink.budget_used()) {
            more = true;
            break;
        }
        let resp = match net::exchange(&request).await {
            Ok(resp) => resp,
            Err(e) if e.contains("is larger than") => {
                // Over the response cap: the same page again, half as large.
                let size = writer.shrink_page(&e)?;
                worker::console_log!("job {}: a page was too large ({e}); page size now {size}", sink.job.id);
                continue;
            }
            Err(e) => return Err(StepError::transient(e)),
        };
        if let Some(answer) = writer.expired(&resp) {
            // Ends like a pause (what was read is kept); the job renews the URL, then goes on.
            expired = Some(answer);
            more = true;
            break;
        }
        writer.on_response(&resp, super::now())?;
        sink.push(&writer.take_output()).await?;
        pages += 1;
    }
    if !more {
        // The finished export's warnings reach the job through the cursor.
        writer.record_end(&mut sink.state);
        let (rest, details) = writer.finish()?;
        sink.push(&rest).await?;
        let artifact = sink.finish(Some(details)).await?;
        if let Some((key, _)) = old_tail {
            drop_tail(sink, key).await;
        }
        return Ok(SliceOutcome::Finished(artifact));
    }
    let mut saved = sink.state.clone();
    let rest = writer.end_slice(&mut saved)?;
    sink.push(&rest).await?;
    sink.settle_all().await?;
    sink.state.tail = None;
    if sink.filled > 0 {
        let key = format!("{}.tail-{}", sink.state.key, sink.state.slices);
        let len = sink.filled as u64;
        let bytes = sink.filled_bytes();
        let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        sink.bucket.put(&key, bytes, "application/octet-stream", &HashMap::new(), digest).await?;
        sink.state.tail = Some((key, len));
    }
    sink.state.cursor = saved.cursor;
    sink.state.warnings = saved.warnings;
    sink.state.stalled = 0;
    sink.save_at(Moment::SlicePaused).await?;
    if let Some((key, _)) = old_tail {
        if sink.state.tail.as_ref().map(|t| &t.0) != Some(&key) {
            drop_tail(sink, key).await;
        }
    }
    Ok(expired.map_or(SliceOutcome::Paused, SliceOutcome::UrlExpired))
}

/// Deletes a tail object the copy no longer needs; a failure is recorded for the daily sweep.
async fn drop_tail(sink: &Sink<'_>, key: String) {
    if let Err(e) = sink.bucket.delete(&key).await {
        worker::console_error!("job {}: deleting the staging object {key} failed: {e}", sink.job.id);
        let leftover = Leftover {
            key,
            job_id: sink.job.id.to_string(),
            reason: format!("deleting a staging object failed: {}", e.message()),
            at: super::now(),
        };
        store::record_leftover(sink.storage, &leftover).await;
    }
}

/// One slice of a replica: the primary object's bytes from the persisted offset, read with one
/// ranged `get` of at most the slice's bytes (rounded up to whole parts, so a slice that does not
/// reach the end stops at a part boundary). The object must still be the size its manifest
/// says, and keep the ETag the copy started with; the whole file's SHA-256 is compared with the
/// manifest by the job when the file is complete.
async fn r2_slice(sink: &mut Sink<'_>, primary: &Bucket, key: &str, size: u64) -> Result<SliceOutcome, StepError> {
    if sink.state.all_stored() {
        // Every byte was stored before the last slice was cut off.
        return sink.finish(None).await.map(SliceOutcome::Finished);
    }
    let head =
        primary.head(key.to_string()).await.map_err(|e| r2_err("head", e))?.ok_or_else(|| {
            StepError::permanent(format!("the primary object {key} is missing; nothing was replicated"))
        })?;
    if head.size() != size {
        return Err(StepError::permanent(format!(
            "the primary object {key} holds {} bytes, its manifest says {size}",
            head.size()
        )));
    }
    let etag = head.etag();
    match &sink.state.validators {
        Some(v) if v.etag.as_deref() != Some(etag.as_str()) => {
            return Err(StepError::permanent(format!(
                "the primary object {key} changed during the copy (its ETag was {}, now {etag})",
                v.etag.as_deref().unwrap_or("?")
            )));
        }
        Some(_) => {}
        None => {
            sink.state.validators =
                Some(crate::transfer::Validators { etag: Some(etag), last_modified: None, length: Some(size) });
        }
    }
    let offset = sink.state.offset;
    let part = sink.settings.part_size;
    let budget = sink.settings.slice_bytes.div_ceil(part).max(1) * part;
    let length = (size - offset).min(budget);
    let object = primary
        .get(key.to_string())
        .range(worker::Range::OffsetWithLength { offset, length })
        .execute()
        .await
        .map_err(|e| r2_err("get", e))?
        .ok_or_else(|| StepError::permanent(format!("the primary object {key} is missing; nothing was replicated")))?;
    let body = object.body().ok_or_else(|| StepError::transient(format!("R2 returned no body for {key}")))?;
    let mut stream = body.stream().map_err(|e| r2_err("read", e))?;
    let mut got = 0u64;
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.map_err(|e| r2_err("read", e))?;
        got += chunk.len() as u64;
        if got > length {
            return Err(StepError::transient(format!("R2 returned more than the {length} bytes asked of {key}")));
        }
        sink.push(&chunk).await?;
        let elapsed = Duration::from_millis((js_sys::Date::now() - sink.started_ms).max(0.0) as u64);
        if got < length && (elapsed >= sink.settings.slice_time || worker::signal::is_near_cpu_limit()) {
            // Out of time: what is not in a stored part is read again by the next slice.
            sink.settle_all().await?;
            sink.filled = 0;
            sink.save_at(Moment::SlicePaused).await?;
            return Ok(SliceOutcome::Paused);
        }
    }
    if got != length {
        return Err(StepError::transient(format!("R2 returned {got} of {length} bytes of {key}")));
    }
    if sink.position() == size {
        return sink.finish(None).await.map(SliceOutcome::Finished);
    }
    sink.settle_all().await?;
    sink.save_at(Moment::SlicePaused).await?;
    Ok(SliceOutcome::Paused)
}
