//! Sliced, resumable copies: the pure half of the transfer engine.
//!
//! One artifact is copied in *slices*, each well inside one invocation's budgets (bytes and wall
//! clock, see [`TransferSettings`]). A copy's [`CopyState`] holds the multipart upload id, the
//! parts stored so far (their records, number, etag, size, SHA-256, kept apart), the byte
//! offset, the serialized SHA-256 state of the whole artifact up to that offset, the source's
//! validators and, for a generated file, the page cursor and the parked tail. A download's next
//! slice asks for `Range: bytes=<offset>-` with `If-Range`, and [`CopyState::check_response`]
//! decides whether the answer continues the copy or restarts it from zero (a `200`, a changed
//! validator, a range that does not start at the offset).
//!
//! One rule says when that state is saved: exactly at the copy's *resume points*, the moments
//! where offset, hash state, parts and (for a generated file) cursor and tail all agree, so a
//! slice cut off anywhere resumes from the last state saved. Which moments those are is a
//! property of the source ([`ResumePoints`], read off the order by `CopySource::resume_points`): every
//! settled part of a download or a replica, only a slice's end for a generated file. [`ResumePoints::save_at`] answers, for each [`Moment`] the
//! runtime reaches (upload created, part settled, restart, slice paused, file finished, slice
//! failed), what it writes ([`Save`]), and [`ResumePoints::after_failure`] where a failed slice
//! leaves the copy. The runtime only executes those answers.
//!
//! Each byte is written once, straight to its final key; the whole-file SHA-256 (as `sha256sum`
//! prints it) and the per-part hashes go into the manifest, which stays the commit marker.
//! Nothing here does I/O: the runtime (`runtime::transfer`) performs the slice.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};

use crate::error::StepError;
use crate::fields::{self, FieldError};
use crate::http::HttpRequest;
use crate::time::Timestamp;

const MIB: u64 = 1024 * 1024;
/// What an isolate may spend on buffered parts: 128 MB less room for the runtime, the JS heap's
/// own needs and one download chunk.
pub const MEMORY_BUDGET: u64 = 96 * MIB;
/// Memory a copy needs besides its part buffers (chunks, compressor, bookkeeping).
pub const MEMORY_OVERHEAD: u64 = 4 * MIB;
/// Smallest part size in MiB: R2's minimum for every part but the last.
pub const MIN_PART_MIB: u64 = 5;
/// Largest part size in MiB Ferry buffers: (parts in flight + 1) parts must fit [`MEMORY_BUDGET`].
pub const MAX_PART_MIB: u64 = 32;
/// R2's limit on parts per upload.
pub const MAX_PARTS: u32 = 10_000;
/// How long a slice may overrun its own time budget (the parts in flight settle) before it is
/// given up and the copy goes on from what was persisted.
pub const SLICE_GRACE: Duration = Duration::from_secs(180);
/// The wall clock one Durable Object alarm invocation may run: 15 minutes (Cloudflare docs,
/// Workers "Limits", the wall-time table: "DO alarm: 15 min").
pub const INVOCATION_WALL_CLOCK: Duration = Duration::from_secs(15 * 60);
/// What a slice leaves of [`INVOCATION_WALL_CLOCK`] for the step's own bookkeeping (persisting
/// the outcome, arming the next alarm).
pub const INVOCATION_MARGIN: Duration = Duration::from_secs(30);
/// Keys one Durable Object storage call may take (`put`, `get` or `delete` of many keys): 128
/// (Cloudflare docs, Durable Objects Storage API: `get`/`put`/`delete` of an array or object
/// take up to 128 keys; miniflare's `durable-objects/src/storage.ts` enforces `MAX_KEYS = 128`).
pub const STORAGE_KEYS_PER_CALL: usize = 128;

/// How a source's copies are cut into slices and pipelined: the source's `part_size_mib`,
/// `parts_in_flight`, `slice_max_*`, `max_stalled_slices` and `copy_timeout_minutes` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSettings {
    /// Size of every multipart part but the last (R2 takes 5 MiB at least; more than 32 MiB
    /// cannot be buffered, see [`MEMORY_BUDGET`]).
    #[serde(
        rename = "part_size_mib",
        serialize_with = "fields::ser_mib",
        deserialize_with = "fields::mib::<_, MIN_PART_MIB, MAX_PART_MIB>"
    )]
    pub part_size: u64,
    /// Parts uploading while the next one downloads.
    #[serde(deserialize_with = "fields::count::<_, 1, 16>")]
    pub parts_in_flight: u32,
    /// Bytes one slice copies at most (it always stores at least one part).
    #[serde(
        rename = "slice_max_mib",
        serialize_with = "fields::ser_mib",
        deserialize_with = "fields::mib::<_, MIN_PART_MIB, 1_048_576>"
    )]
    pub slice_bytes: u64,
    /// Wall-clock time one slice runs at most before it stops at the next part boundary (an
    /// alarm may run 15 minutes; a slice stays well inside that).
    #[serde(
        rename = "slice_max_seconds",
        serialize_with = "fields::ser_secs",
        deserialize_with = "fields::secs::<_, 1, 600>"
    )]
    pub slice_time: Duration,
    /// Pages of a generated export (Aura Query API calls) one slice reads at most.
    #[serde(rename = "slice_max_pages", deserialize_with = "fields::count::<_, 1, 5000>")]
    pub slice_pages: u32,
    /// Consecutive slices that may end without a new part before the job fails.
    #[serde(deserialize_with = "fields::count::<_, 1, 1000>")]
    pub max_stalled_slices: u32,
    /// Times an artifact may restart from zero (source replaced, ranges ignored) before failing.
    #[serde(skip)]
    pub max_restarts: u32,
    /// How long copying all of a job's files may take.
    #[serde(
        rename = "copy_timeout_minutes",
        serialize_with = "fields::ser_minutes",
        deserialize_with = "fields::minutes::<_, 1, 10_080>"
    )]
    pub copy_timeout: Duration,
}

impl Default for TransferSettings {
    fn default() -> Self {
        Self {
            part_size: 8 * MIB,
            parts_in_flight: 2,
            slice_bytes: 1024 * MIB,
            slice_time: Duration::from_secs(300),
            slice_pages: 500,
            max_stalled_slices: 5,
            max_restarts: 3,
            copy_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

impl TransferSettings {
    /// What serde cannot check: the buffers of a copy fit the isolate.
    pub fn check(&self) -> Result<(), FieldError> {
        if self.peak_memory() > MEMORY_BUDGET {
            return Err(FieldError::new(
                "part_size_mib",
                format!(
                    "and parts_in_flight need {} MiB of buffers ((parts_in_flight + 1) x part_size_mib + {} MiB), \
                     more than the {} MiB a 128 MB isolate can spare; lower part_size_mib or parts_in_flight",
                    self.peak_memory() >> 20,
                    MEMORY_OVERHEAD >> 20,
                    MEMORY_BUDGET >> 20
                ),
            ));
        }
        Ok(())
    }

    /// The most memory a copy with these settings holds: parts in flight, the part being filled,
    /// and a constant.
    pub fn peak_memory(&self) -> u64 {
        (u64::from(self.parts_in_flight) + 1) * self.part_size + MEMORY_OVERHEAD
    }

    /// True when a slice that has copied `bytes` for `elapsed` should stop at this part boundary.
    pub fn slice_done(&self, bytes: u64, elapsed: Duration) -> bool {
        bytes >= self.slice_bytes || elapsed >= self.slice_time
    }

    /// How long the runtime lets one slice run before it gives the slice up. A slice that can
    /// stop at a part boundary gets its time budget plus [`SLICE_GRACE`]; a copy that cannot
    /// resume (`no_ranges`: the source ignores ranges or cannot say where the object ends) runs
    /// to its end in one invocation, so it gets the invocation's own ceiling.
    pub fn slice_limit(&self, no_ranges: bool) -> Duration {
        let ceiling = INVOCATION_WALL_CLOCK.saturating_sub(INVOCATION_MARGIN);
        if no_ranges {
            ceiling
        } else {
            (self.slice_time + SLICE_GRACE).min(ceiling)
        }
    }
}

/// Cuts `items` into the calls a Durable Object storage batch may take, each of at most
/// [`STORAGE_KEYS_PER_CALL`] keys, in order.
pub fn storage_batches<T>(items: Vec<T>) -> Vec<Vec<T>> {
    let mut batches = Vec::with_capacity(items.len().div_ceil(STORAGE_KEYS_PER_CALL));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        batches.push(items.by_ref().take(STORAGE_KEYS_PER_CALL).collect());
    }
    batches
}

/// The storage writes of a copy's progress, in order: the part records (and any other entries)
/// first, the job's own record in the last call. Every call stays within
/// [`STORAGE_KEYS_PER_CALL`], and the job never names a part whose record was not written
/// before it (records past the job's count are leftovers, overwritten when written again).
pub fn progress_batches(records: Vec<(String, String)>, job: Option<(String, String)>) -> Vec<Vec<(String, String)>> {
    let mut all = records;
    all.extend(job);
    storage_batches(all)
}

/// Puts into `artifacts` the part hashes `from` lists for the same keys (a replica's manifest
/// takes the primary manifest's, which its job's record does not keep).
pub fn copy_part_hashes(artifacts: &mut [crate::manifest::Artifact], from: &[crate::manifest::Artifact]) {
    for artifact in artifacts {
        if let Some(source) = from.iter().find(|f| f.key == artifact.key) {
            artifact.part_sha256.clone_from(&source.part_sha256);
        }
    }
}

/// The SHA-256 of each part of a finished copy, from its part records as listed under
/// `part:{job}:{file}:` (keys `…:{restarts}:{number}`, each a [`PartRecord`]): the newest set
/// (a restart starts a fresh one; an older set may remain if its clean-up failed), its first
/// `parts` records, which must be numbered 1..=`parts`.
pub fn final_part_hashes(entries: &[(String, String)], parts: u32) -> Result<Vec<String>, StepError> {
    let generation = |key: &str| -> Option<u32> { key.rsplit(':').nth(1).and_then(|g| g.parse().ok()) };
    let newest = entries.iter().filter_map(|(k, _)| generation(k)).max();
    let mut records: Vec<PartRecord> = Vec::new();
    for (key, text) in entries {
        if generation(key) != newest || newest.is_none() {
            continue;
        }
        let record: PartRecord = serde_json::from_str(text)
            .map_err(|e| StepError::permanent(format!("the part record {key} is unreadable: {e}")))?;
        records.push(record);
    }
    records.sort_by_key(|r| r.number);
    records.truncate(parts as usize);
    let numbered = records.iter().enumerate().all(|(i, p)| usize::from(p.number) == i + 1);
    if records.len() != parts as usize || !numbered {
        return Err(StepError::permanent(format!(
            "{} part records were found for a file of {parts} parts; its manifest cannot list their SHA-256",
            records.len()
        )));
    }
    Ok(records.into_iter().map(|r| r.sha256).collect())
}

/// What identifies the bytes being copied, so a resumed slice can tell they did not change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    /// The `ETag` (strong or weak, as sent).
    pub etag: Option<String>,
    /// The `Last-Modified` date, as sent.
    pub last_modified: Option<String>,
    /// The full length, when the source said.
    pub length: Option<u64>,
}

impl Validators {
    fn from_headers(headers: &[(String, String)], length: Option<u64>) -> Self {
        Self {
            etag: header(headers, "etag").map(str::to_string),
            last_modified: header(headers, "last-modified").map(str::to_string),
            length,
        }
    }

    /// The `If-Range` value: a strong ETag, else the date (a weak ETag may not be used).
    pub(crate) fn if_range(&self) -> Option<&str> {
        match &self.etag {
            Some(e) if !e.starts_with("W/") => Some(e),
            _ => self.last_modified.as_deref(),
        }
    }

    /// Why `other` is not the same object, if it is not.
    pub(crate) fn changed(&self, other: &Self) -> Option<String> {
        if let (Some(a), Some(b)) = (&self.etag, &other.etag) {
            if a != b {
                return Some(format!("its ETag changed from {a} to {b}"));
            }
        }
        if let (Some(a), Some(b)) = (&self.last_modified, &other.last_modified) {
            if a != b {
                return Some(format!("its Last-Modified changed from {a} to {b}"));
            }
        }
        if let (Some(a), Some(b)) = (self.length, other.length) {
            if a != b {
                return Some(format!("its length changed from {a} to {b} bytes"));
            }
        }
        None
    }
}

/// The storage prefix of every part record of a job's copies (deleted when the job ends).
pub fn job_parts_prefix(job: &str) -> String {
    format!("part:{job}:")
}

/// One stored part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// Part number, from 1.
    pub number: u16,
    /// R2's etag of the part (needed to complete the upload).
    pub etag: String,
    /// Bytes in the part.
    pub size: u64,
    /// Lower-case hex SHA-256 of the part's bytes.
    pub sha256: String,
}

/// A file Ferry writes itself from paged API reads (the Aura graph export, D1's query artifact):
/// what one slice of its copy drives. Every method is pure; the runtime sends the requests.
pub trait Generator {
    /// The next page's request, or `None` when every page has been read.
    fn next_request(&self) -> Option<HttpRequest>;
    /// Writes one page's answer.
    fn on_response(&mut self, resp: &crate::http::HttpResponse, now: Timestamp) -> Result<(), StepError>;
    /// Bytes produced so far (drained).
    fn take_output(&mut self) -> Vec<u8>;
    /// A page was over the response cap: smaller pages from now on; the new size.
    fn shrink_page(&mut self, why: &str) -> Result<u32, StepError>;
    /// Ends this slice: the bytes not taken yet, and the cursor stored into `state`.
    fn end_slice(self: Box<Self>, state: &mut CopyState) -> Result<Vec<u8>, StepError>;
    /// Ends the file: its last bytes and the artifact's `details`.
    fn finish(self: Box<Self>) -> Result<(Vec<u8>, serde_json::Value), StepError>;
    /// Before [`Generator::finish`]: what of the finished file the job reads from `state` (the
    /// graph export's warnings travel in its cursor). Nothing by default.
    fn record_end(&self, _state: &mut CopyState) {}
    /// Whether `resp` refuses a signed URL that expired (an encrypted download's page): the
    /// slice then ends as a pause would, and the job asks the provider for a fresh URL. `None`
    /// by default.
    fn expired(&self, _resp: &crate::http::HttpResponse) -> Option<String> {
        None
    }
}

/// The persisted progress of one artifact's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    /// The final R2 key.
    pub key: String,
    /// The open multipart upload, once one was created.
    pub upload_id: Option<String>,
    /// Which of the job's files this is (part records are keyed by it).
    #[serde(default)]
    pub file: u32,
    /// Parts stored, each contiguous with the previous. Their records (etag, size, SHA-256) are
    /// kept by the runtime apart from this state, one storage entry each under
    /// [`CopyState::part_prefix`], so this state stays small however many parts there are.
    #[serde(default)]
    pub parts_stored: u32,
    /// Bytes stored in `parts`: where the next slice resumes.
    pub offset: u64,
    /// Hex of the serialized SHA-256 state over bytes `0..offset`.
    pub hash_state: String,
    /// What the source said about the object when the copy (re)started.
    pub validators: Option<Validators>,
    /// Slices started.
    pub slices: u32,
    /// Consecutive slices that stored no new part (the one running counts).
    pub stalled: u32,
    /// Times the copy went back to byte 0.
    pub restarts: u32,
    /// Why it last did.
    pub last_restart: Option<String>,
    /// The copy cannot resume: the source answered a range request with the whole object, said
    /// `Accept-Ranges: none`, or cannot say where the object ends. Slices of this copy run to the
    /// end, with the invocation's whole wall clock ([`TransferSettings::slice_limit`]).
    #[serde(default)]
    pub no_ranges: bool,
    /// Generated artifacts only: where the generator stopped, in the generator's own type (see
    /// [`CopyState::cursor_as`]); states saved before named it `graph` or `query`.
    #[serde(default, alias = "graph", alias = "query", skip_serializing_if = "Option::is_none")]
    pub cursor: Option<serde_json::Value>,
    /// Generated artifacts only: what the generator warned of (a paging plan that scans); the
    /// job lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Generated artifacts only: the R2 key holding bytes produced after `offset` that did not
    /// fill a part yet, and how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<(String, u64)>,
    /// SQL dumps only: the MD5 and row counts over bytes `0..offset` (see `crate::dump`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tally: Option<crate::dump::TallyState>,
    /// When the copy of this artifact started.
    pub started_at: Timestamp,
}

/// What a download's answer means for the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The body continues the copy at `offset` (a `206` from the offset, or a `200` at zero).
    Continue,
    /// The stored parts do not fit what the source now sends: start again from byte 0. The body
    /// is the whole object from byte 0 when `body_from_zero`; otherwise ask again without a range.
    StartOver {
        /// Why, for the job's record.
        reason: String,
        /// Whether this response's body can be used as the restart.
        body_from_zero: bool,
    },
    /// The answer cannot be stored as the file: fail the job with this reason.
    Refuse(String),
}

/// A header's trimmed value, by case-insensitive name.
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
}

/// Parses `Content-Range: bytes a-b/total` (total may be `*`).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let (a, b) = (a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?);
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if total.is_some_and(|t| b >= t) {
        return None;
    }
    Some((a, b, total))
}

/// The length a response body declares.
fn declared_length(headers: &[(String, String)]) -> Option<u64> {
    header(headers, "content-length").and_then(|v| v.parse::<u64>().ok())
}

/// The content coding of an answer, when it is not the identity Ferry asks for. `fetch` decodes
/// such a body on the way in, so its bytes would not be the bytes the source sent, nor would its
/// `Content-Length` describe them.
fn content_coding(headers: &[(String, String)]) -> Option<&str> {
    header(headers, "content-encoding").filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
}

/// A fresh SHA-256 state, hex-encoded.
fn fresh_hash_state() -> String {
    save_hasher(&Sha256::new())
}

/// Serializes a hasher's state (about 100 bytes) as hex.
pub fn save_hasher(hasher: &Sha256) -> String {
    hex::encode(hasher.serialize().as_slice())
}

/// Restores a hasher from [`save_hasher`]'s output.
pub fn load_hasher(state: &str) -> Result<Sha256, StepError> {
    let bad = || StepError::permanent("the copy's saved SHA-256 state is corrupt; the copy cannot resume");
    let bytes = hex::decode(state).map_err(|_| bad())?;
    let array = SerializedState::<Sha256>::try_from(bytes.as_slice()).map_err(|_| bad())?;
    Sha256::deserialize(&array).map_err(|_| bad())
}

impl CopyState {
    /// A copy of a new artifact to `key`, from byte 0.
    pub fn new(key: String, file: u32, now: Timestamp) -> Self {
        Self {
            key,
            file,
            upload_id: None,
            parts_stored: 0,
            offset: 0,
            hash_state: fresh_hash_state(),
            validators: None,
            slices: 0,
            stalled: 0,
            restarts: 0,
            last_restart: None,
            no_ranges: false,
            cursor: None,
            warnings: Vec::new(),
            tail: None,
            tally: None,
            started_at: now,
        }
    }

    /// The generator's cursor, read back as the type it was stored as; `None` before the first
    /// slice ended. A cursor that does not read back is a permanent error, never a silent
    /// restart from the beginning of a file whose first parts are already stored.
    pub fn cursor_as<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, StepError> {
        self.read_cursor(self.cursor.as_ref())
    }

    /// A cursor of this copy held elsewhere (an encrypted copy keeps its inner generator's inside
    /// its own), read back as [`CopyState::cursor_as`] reads the copy's.
    pub fn read_cursor<T: serde::de::DeserializeOwned>(
        &self,
        value: Option<&serde_json::Value>,
    ) -> Result<Option<T>, StepError> {
        value
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| StepError::permanent(format!("the saved cursor of {} does not read back: {e}", self.key)))
    }

    /// Stores the generator's cursor.
    pub fn set_cursor<T: Serialize>(&mut self, cursor: &T) -> Result<(), StepError> {
        let value = serde_json::to_value(cursor)
            .map_err(|e| StepError::permanent(format!("the cursor of {} does not serialize: {e}", self.key)))?;
        self.cursor = Some(value);
        Ok(())
    }

    /// The download request for the next slice: the plain GET at zero, otherwise with
    /// `Range: bytes=<offset>-` and, when the source gave a validator, `If-Range`.
    pub fn range_request(&self, base: HttpRequest) -> HttpRequest {
        let req = base.header("accept-encoding", "identity");
        if self.offset == 0 {
            return req;
        }
        let req = req.header("range", format!("bytes={}-", self.offset));
        match self.validators.as_ref().and_then(Validators::if_range) {
            Some(v) => req.header("if-range", v.to_string()),
            None => req,
        }
    }

    /// True when every byte is stored and only completing the upload is left.
    pub fn all_stored(&self) -> bool {
        self.offset > 0 && self.validators.as_ref().and_then(|v| v.length) == Some(self.offset)
    }

    /// Decides what a successful (2xx) download answer means, and records the validators when
    /// the copy starts at zero.
    pub fn check_response(&mut self, status: u16, headers: &[(String, String)]) -> Resume {
        if let Some(coding) = content_coding(headers) {
            return Resume::Refuse(format!(
                "the source answered with Content-Encoding: {coding} although Ferry asked for the identity \
                 encoding; Ferry stores a file's bytes exactly as the source holds them, so nothing was stored"
            ));
        }
        let declared = declared_length(headers);
        let content_range = header(headers, "content-range").and_then(parse_content_range);
        if self.offset == 0 {
            let length = match (status, content_range) {
                (206, Some((0, _, total))) => total,
                (206, _) => {
                    return Resume::StartOver {
                        reason: "the source answered a plain request with a partial range".into(),
                        body_from_zero: false,
                    }
                }
                _ => declared,
            };
            self.validators = Some(Validators::from_headers(headers, length));
            // RFC 9110 §14.3: a server that supports no range requests for the resource may say
            // `Accept-Ranges: none`; such a copy cannot resume, so it runs to its end now.
            if header(headers, "accept-ranges").is_some_and(|v| v.eq_ignore_ascii_case("none")) {
                self.no_ranges = true;
            }
            return Resume::Continue;
        }
        let known = self.validators.clone().unwrap_or_default();
        match status {
            206 => {
                let Some((start, _, total)) = content_range else {
                    return Resume::StartOver {
                        reason: "the source sent a partial answer without a valid Content-Range".into(),
                        body_from_zero: false,
                    };
                };
                let now = Validators::from_headers(headers, total.or(known.length));
                if let Some(why) = known.changed(&now) {
                    return Resume::StartOver {
                        reason: format!("the source object changed: {why}"),
                        body_from_zero: false,
                    };
                }
                if start != self.offset {
                    return Resume::StartOver {
                        reason: format!("asked for bytes from {} but the source sent them from {start}", self.offset),
                        body_from_zero: false,
                    };
                }
                if known.length.is_none() {
                    if total.is_none() {
                        // Neither the first answer nor this one says where the object ends: a
                        // body cut off cleanly would look whole. Copy it again from zero, to its
                        // end in one go.
                        self.no_ranges = true;
                        return Resume::StartOver {
                            reason: format!(
                                "the source sent bytes from {} without saying the object's length (Content-Range                                  total \"*\"), so the rest could not be checked to its end",
                                self.offset
                            ),
                            body_from_zero: false,
                        };
                    }
                    if let Some(v) = self.validators.as_mut() {
                        v.length = total;
                    }
                }
                Resume::Continue
            }
            _ => {
                let now = Validators::from_headers(headers, declared);
                let reason = match known.changed(&now) {
                    Some(why) => format!("the source object changed: {why}"),
                    None => {
                        self.no_ranges = true;
                        format!("the source ignored the range request for bytes from {}", self.offset)
                    }
                };
                Resume::StartOver { reason, body_from_zero: true }
            }
        }
    }

    /// Decides what `416 Range Not Satisfiable` to `Range: bytes=<offset>-` means: `Ok` when it
    /// proves every byte was stored (`Content-Range: bytes */<offset>` of the same object, whose
    /// length is then recorded), else why the copy must restart from zero (the object is now
    /// shorter or longer, or was replaced: a length other than the one it started with, or a
    /// changed or unconfirmed validator).
    pub fn check_unsatisfiable(&mut self, headers: &[(String, String)]) -> Result<(), String> {
        let offset = self.offset;
        let refused = format!("the source refused the range from byte {offset} (HTTP 416)");
        let total = header(headers, "content-range")
            .and_then(|v| v.strip_prefix("bytes */"))
            .and_then(|t| t.trim().parse::<u64>().ok());
        let Some(total) = total else {
            return Err(format!("{refused} without saying the object's length"));
        };
        if total != offset {
            return Err(format!("{refused}: the object now holds {total} bytes"));
        }
        let known = self.validators.clone().unwrap_or_default();
        if let Some(length) = known.length {
            if length != total {
                return Err(format!(
                    "{refused}: the object held {length} bytes when the copy started and now {total}; it was replaced"
                ));
            }
        }
        let now = Validators::from_headers(headers, Some(total));
        if let Some(why) = known.changed(&now) {
            return Err(format!("{refused}: the source object changed: {why}"));
        }
        let confirmed = (known.etag.is_some() && known.etag == now.etag)
            || (known.last_modified.is_some() && known.last_modified == now.last_modified);
        if known.length.is_none() && !confirmed {
            return Err(format!("{refused}: nothing shows it is still the object the copy started on"));
        }
        if let Some(v) = self.validators.as_mut() {
            v.length = Some(total);
        }
        Ok(())
    }

    /// Goes back to byte 0; returns the multipart upload to abort, if one was open.
    pub fn restart(&mut self, reason: String) -> Option<String> {
        self.restarts += 1;
        self.last_restart = Some(reason);
        self.parts_stored = 0;
        self.offset = 0;
        self.hash_state = fresh_hash_state();
        self.validators = None;
        self.cursor = None;
        self.warnings.clear();
        self.tail = None;
        if self.tally.is_some() {
            self.tally = Some(crate::dump::TallyState::fresh());
        }
        self.upload_id.take()
    }

    /// Records a stored part (in order) and the hash state after it: progress. The caller keeps
    /// the record itself under [`CopyState::part_key`].
    pub fn record_part(&mut self, part: &PartRecord, hash_state: String) {
        self.offset += part.size;
        self.parts_stored += 1;
        self.hash_state = hash_state;
        self.stalled = 0;
    }

    /// The next part number.
    pub fn next_part_number(&self) -> u32 {
        self.parts_stored + 1
    }

    /// The storage prefix of this copy's part records (a restart starts a fresh set).
    pub fn part_prefix(&self, job: &str) -> String {
        format!("{}{}:{}:", job_parts_prefix(job), self.file, self.restarts)
    }

    /// The storage key of part `number`'s record; keys sort in part order.
    pub fn part_key(&self, job: &str, number: u16) -> String {
        format!("{}{number:05}", self.part_prefix(job))
    }

    /// An error when part `number` would pass R2's limit of parts per upload.
    pub fn check_part_limit(&self, number: u32, filename: &str, part_size: u64) -> Result<(), StepError> {
        if number > MAX_PARTS {
            return Err(StepError::permanent(format!(
                "{filename} needs more than {MAX_PARTS} parts of {} MiB; raise part_size_mib",
                part_size / MIB
            )));
        }
        Ok(())
    }

    /// Checks the part records read back for completion: exactly the parts stored, numbered
    /// 1..=n in order, adding up to the offset.
    pub fn check_parts(&self, records: &[PartRecord]) -> Result<(), StepError> {
        let numbered = records.iter().enumerate().all(|(i, p)| usize::from(p.number) == i + 1);
        let total: u64 = records.iter().map(|p| p.size).sum();
        if records.len() as u32 != self.parts_stored || !numbered || total != self.offset {
            return Err(StepError::permanent(format!(
                "the records of {}'s parts do not add up ({} records for {} parts, {total} of {} bytes); the copy \
                 cannot complete",
                self.key,
                records.len(),
                self.parts_stored,
                self.offset
            )));
        }
        Ok(())
    }
}

/// When a copy saves its state, as one rule: exactly at its *resume points*, the moments where
/// the offset, the hash state, the stored parts and (for a generated file) the cursor and the
/// parked tail all agree, so a slice cut off anywhere resumes from the last state saved. Which
/// moments are resume points is a property of the copy's source: how its bytes are read, from
/// an offset or from a page cursor (`CopySource::resume_points` in `crate::job` reads it off the order's
/// `CopySource`). The runtime asks [`ResumePoints::save_at`] what to write at each [`Moment`] it
/// reaches, and [`ResumePoints::after_failure`] where a failed slice leaves the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumePoints {
    /// A download or a replica: the bytes are read from an offset, so every settled part is a
    /// resume point (the offset and the hash state move with the parts).
    EveryPart,
    /// A generated file (the Aura graph export, D1's query artifact): it goes on from a page
    /// cursor, which agrees with the stored parts only at the end of a slice, once the bytes that
    /// do not fill a part are parked in the tail object (`<key>.tail-<slice>`).
    SliceEnd,
}

/// A moment of a slice at which the runtime asks [`ResumePoints::save_at`] what to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// A multipart upload was just created; no part of it has been sent.
    UploadCreated,
    /// R2 confirmed a part and the copy's state counts it.
    PartSettled,
    /// The copy went back to byte 0 (its upload aborted).
    Restarted,
    /// The slice used its budget: every part sent is settled and, for a generated file, the tail
    /// is parked and the cursor is in the state.
    SlicePaused,
    /// Every byte of the file is in a settled part; the upload is about to be completed from the
    /// stored part records.
    FileFinished,
    /// The slice failed; for a copy that keeps them, the parts R2 confirmed are settled.
    SliceFailed,
}

/// What the runtime writes at a [`Moment`], in one write cut by [`progress_batches`]: the
/// records waiting since the last write (the parts settled, an upload just created) first, then,
/// at a resume point, the job with the copy's state. The job never goes without the records
/// before it, so the state it stores never counts a part whose record is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Save {
    /// Nothing now: waiting records stay in memory until the next write.
    Nothing,
    /// The waiting records only: the stored state stays at the last resume point. Records past
    /// its count are leftovers, rewritten under the same keys when those parts are sent again.
    Records,
    /// The waiting records, then the job with the copy's state: a new resume point is stored.
    RecordsAndState,
}

impl ResumePoints {
    /// What to write at `moment`: the job with the copy's state exactly when the moment is a
    /// resume point, the waiting records whenever the runtime needs them stored.
    pub fn save_at(self, moment: Moment) -> Save {
        match (self, moment) {
            // No part is settled into an upload before it exists, so at its creation the state
            // is the last resume point with the new id: saved before any part is sent, with the
            // upload's record (the daily sweep aborts what a job leaves open).
            (_, Moment::UploadCreated) => Save::RecordsAndState,
            // Byte 0 with no cursor and no tail agrees with every source.
            (_, Moment::Restarted) => Save::RecordsAndState,
            (Self::EveryPart, Moment::PartSettled | Moment::FileFinished | Moment::SliceFailed) => {
                Save::RecordsAndState
            }
            // Its last settled part saved it already.
            (Self::EveryPart, Moment::SlicePaused) => Save::Nothing,
            // Mid-slice the state counts parts the stored cursor has not produced yet.
            (Self::SliceEnd, Moment::PartSettled) => Save::Nothing,
            (Self::SliceEnd, Moment::SlicePaused) => Save::RecordsAndState,
            // Completing the upload reads the part records back; the cursor still names the
            // slice's start, so a completion cut off goes on from there.
            (Self::SliceEnd, Moment::FileFinished) => Save::Records,
            // Its parts do not agree with the stored cursor: they are sent again.
            (Self::SliceEnd, Moment::SliceFailed) => Save::Nothing,
        }
    }

    /// Whether a failed slice first waits for its parts in flight, so that each one R2 confirms
    /// is kept (a download's or a replica's resume point); a generated file's would be sent
    /// again anyway.
    pub fn settles_parts_after_failure(self) -> bool {
        self == Self::EveryPart
    }

    /// The state a failed slice leaves, where the next slice goes on: `now` (every part R2
    /// confirmed) for a copy saved at every part; for a generated file the state the slice
    /// started with, keeping the upload (saved when it was created), whose same part numbers
    /// are simply sent again.
    pub fn after_failure(self, at_start: CopyState, now: CopyState) -> CopyState {
        match self {
            Self::EveryPart => now,
            Self::SliceEnd => CopyState { upload_id: now.upload_id, ..at_start },
        }
    }
}

/// Whether a refused download of a *signed* URL may mean the URL expired (or was revoked):
/// object stores answer `403` (S3: `AccessDenied`, "Request has expired"; R2 the same), D1's
/// expired URLs may answer `404`, some stores `400` with an expiry message. A URL that needs the
/// provider's credentials is never "expired". A fresh URL refused the same way fails the job.
pub fn signed_url_expired(status: u16, body_start: &str) -> bool {
    let text = body_start.to_ascii_lowercase();
    matches!(status, 403 | 404) || (status == 400 && (text.contains("expired") || text.contains("signature")))
}

/// The first line of every D1 SQL dump (provider-apis §1.4: an empty database exports exactly it).
pub const D1_DUMP_START: &str = "PRAGMA defer_foreign_keys=TRUE;";

/// Whether the first bytes of a file (the first read, or the whole file when it is shorter) can
/// be what the provider's file must be: a `.gz`/`.tgz` starts with the gzip magic; a `.sql` (a
/// D1 dump, the only provider file of that name) starts with [`D1_DUMP_START`], so a login page
/// answered `200` after a redirect, or an error text, is never stored as a dump. `None` when it can.
pub fn wrong_start(filename: &str, first: &[u8]) -> Option<String> {
    let name = filename.to_ascii_lowercase();
    let shown = || -> String {
        String::from_utf8_lossy(&first[..first.len().min(40)]).chars().filter(|c| !c.is_control()).collect()
    };
    if name.ends_with(".gz") || name.ends_with(".tgz") {
        if first.len() >= 2 && first[..2] != [0x1f, 0x8b] {
            return Some(format!("{filename} is not gzip data (it starts with {:?}); nothing was stored", shown()));
        }
    } else if name.ends_with(".sql") {
        let text = String::from_utf8_lossy(&first[..first.len().min(64)]).trim_start().to_ascii_lowercase();
        if text.starts_with("<!doctype html") || text.starts_with("<html") {
            return Some(format!("{filename} is an HTML page, not an SQL dump; nothing was stored"));
        }
        if !text.starts_with(&D1_DUMP_START.to_ascii_lowercase()) {
            return Some(format!(
                "{filename} does not start with {D1_DUMP_START:?} as every D1 dump does (it starts with {:?}); \
                 nothing was stored",
                shown()
            ));
        }
    }
    None
}

/// Checks a gzip file streamed through it, to its end: every member's deflate stream complete and
/// its trailer (CRC-32 and length) matching what was inflated. The copy runs it when the source
/// declares no length for a `.gz`/`.tgz`, the one case where a cut-off body that ended cleanly
/// could not otherwise be told from the whole file.
pub struct GzipCheck {
    decoder: flate2::write::MultiGzDecoder<std::io::Sink>,
    seen: u64,
}

impl Default for GzipCheck {
    fn default() -> Self {
        Self { decoder: flate2::write::MultiGzDecoder::new(std::io::sink()), seen: 0 }
    }
}

impl GzipCheck {
    /// Feeds the next bytes of the file.
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), String> {
        use std::io::Write;
        self.seen += bytes.len() as u64;
        self.decoder.write_all(bytes).map_err(|e| format!("is not valid gzip data near byte {}: {e}", self.seen))
    }

    /// Whether what was fed ends a complete gzip stream.
    pub fn finish(mut self) -> Result<(), String> {
        if self.seen == 0 {
            return Err("is empty".into());
        }
        self.decoder.try_finish().map_err(|e| format!("ends before its gzip trailer after {} bytes ({e})", self.seen))
    }
}

/// Everything one copy computes over its bytes, in stream order: the whole file's SHA-256, a SQL
/// dump's MD5 and row tally, and the gzip check when one runs.
///
/// Bytes that live outside wasm memory (a read's JS buffer) are copied into this copy's own
/// staging buffer and hashed in the same synchronous call ([`Digests::absorb_with`]). No other
/// copy can reach the buffer, and there is no point between the copy and the hashing where
/// anything else runs: two copies sharing an isolate (Durable Objects of one class may) can
/// never hash each other's bytes.
pub struct Digests {
    hasher: Sha256,
    tally: Option<crate::dump::Tally>,
    gzip: Option<GzipCheck>,
    staging: Vec<u8>,
}

impl Digests {
    /// The digests of a copy resumed with this hasher and tally.
    pub fn new(hasher: Sha256, tally: Option<crate::dump::Tally>) -> Self {
        Self { hasher, tally, gzip: None, staging: Vec::new() }
    }

    /// Also checks the bytes as one gzip stream from here on.
    pub fn check_gzip(&mut self) {
        self.gzip = Some(GzipCheck::default());
    }

    /// The gzip check, when one runs, to be finished at the file's end.
    pub fn take_gzip(&mut self) -> Option<GzipCheck> {
        self.gzip.take()
    }

    /// Feeds the next bytes of the file (already in wasm memory).
    pub fn absorb(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.hasher.update(bytes);
        if let Some(t) = self.tally.as_mut() {
            t.update(bytes);
        }
        match self.gzip.as_mut() {
            Some(check) => check.update(bytes),
            None => Ok(()),
        }
    }

    /// Feeds the next `len` bytes of the file, which `fill` copies into this copy's own staging
    /// buffer (from JS memory), and hashes them before returning.
    pub fn absorb_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), String> {
        let mut staging = std::mem::take(&mut self.staging);
        if staging.len() < len {
            staging.resize(len, 0);
        }
        fill(&mut staging[..len]);
        let fed = self.absorb(&staging[..len]);
        self.staging = staging;
        fed
    }

    /// The SHA-256 state so far, as [`save_hasher`] writes it.
    pub fn saved_hasher(&self) -> String {
        save_hasher(&self.hasher)
    }

    /// The MD5 and row tally so far, for a SQL dump.
    pub fn saved_tally(&self) -> Option<crate::dump::TallyState> {
        self.tally.as_ref().map(crate::dump::Tally::save)
    }

    /// Back to byte 0 (the copy restarts).
    pub fn reset(&mut self) {
        self.hasher = Sha256::new();
        if self.tally.is_some() {
            self.tally = Some(crate::dump::Tally::default());
        }
        if self.gzip.is_some() {
            self.gzip = Some(GzipCheck::default());
        }
    }

    /// The whole file's SHA-256 so far.
    pub fn sha256(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.hasher.clone().finalize());
        out
    }

    /// A SQL dump's MD5 and rows per table so far.
    pub fn tally(&self) -> Option<(String, std::collections::BTreeMap<String, u64>)> {
        self.tally.as_ref().map(crate::dump::Tally::finish)
    }
}

pub mod sealed;

#[cfg(test)]
mod resume_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_saved_under_its_old_field_names_reads_back_as_its_generators_type() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Cursor {
            after: String,
        }
        let mut state = CopyState::new("src/f/graph.jsonl.gz".into(), 0, Timestamp::from_secs(0));
        state.set_cursor(&Cursor { after: "4:x:9".into() }).unwrap();
        let saved = serde_json::to_value(&state).unwrap();
        for old_name in ["graph", "query"] {
            let mut old = saved.clone();
            let cursor = old.as_object_mut().unwrap().remove("cursor").unwrap();
            old[old_name] = cursor;
            let back: CopyState = serde_json::from_value(old).unwrap();
            assert_eq!(back.cursor_as::<Cursor>().unwrap(), Some(Cursor { after: "4:x:9".into() }));
        }
        state.cursor = Some(serde_json::json!("not a cursor"));
        let err = state.cursor_as::<Cursor>().unwrap_err();
        assert!(!err.is_retryable() && err.message().contains("does not read back"), "{err}");
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn started(len: u64) -> CopyState {
        let mut s = CopyState::new("src/f/x.gz".into(), 0, Timestamp::from_secs(0));
        let r = s.check_response(200, &h(&[("etag", "\"v1\""), ("content-length", &len.to_string())]));
        assert_eq!(r, Resume::Continue);
        s.record_part(
            &PartRecord { number: 1, etag: "e1".into(), size: 10, sha256: "aa".into() },
            save_hasher(&Sha256::new()),
        );
        s
    }

    #[test]
    fn first_request_has_no_range_and_asks_for_identity() {
        let s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        let r = s.range_request(HttpRequest::get("https://x/f"));
        assert_eq!(r.header_value("range"), None);
        assert_eq!(r.header_value("accept-encoding"), Some("identity"));
    }

    #[test]
    fn resumed_request_asks_for_the_rest_with_if_range() {
        let s = started(100);
        let r = s.range_request(HttpRequest::get("https://x/f"));
        assert_eq!(r.header_value("range"), Some("bytes=10-"));
        assert_eq!(r.header_value("if-range"), Some("\"v1\""));
    }

    #[test]
    fn weak_etags_fall_back_to_last_modified_for_if_range() {
        let mut s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        s.check_response(200, &h(&[("etag", "W/\"v\""), ("last-modified", "Sat, 28 Nov 2026 00:00:00 GMT")]));
        s.record_part(
            &PartRecord { number: 1, etag: "e".into(), size: 5, sha256: String::new() },
            s.hash_state.clone(),
        );
        let r = s.range_request(HttpRequest::get("https://x/f"));
        assert_eq!(r.header_value("if-range"), Some("Sat, 28 Nov 2026 00:00:00 GMT"));
    }

    #[test]
    fn a_206_from_the_offset_continues() {
        let mut s = started(100);
        let r = s.check_response(206, &h(&[("etag", "\"v1\""), ("content-range", "bytes 10-99/100")]));
        assert_eq!(r, Resume::Continue);
    }

    #[test]
    fn a_200_on_resume_restarts_with_that_body() {
        let mut s = started(100);
        match s.check_response(200, &h(&[("etag", "\"v1\""), ("content-length", "100")])) {
            Resume::StartOver { reason, body_from_zero } => {
                assert!(body_from_zero);
                assert!(reason.contains("ignored the range"), "{reason}");
                assert!(s.no_ranges, "later slices run to the end");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_changed_etag_restarts() {
        let mut s = started(100);
        match s.check_response(206, &h(&[("etag", "\"v2\""), ("content-range", "bytes 10-99/100")])) {
            Resume::StartOver { reason, body_from_zero } => {
                assert!(!body_from_zero);
                assert!(reason.contains("ETag changed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match s.check_response(200, &h(&[("etag", "\"v2\"")])) {
            Resume::StartOver { reason, body_from_zero: true } => assert!(reason.contains("ETag"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(!s.no_ranges, "a replaced object says nothing about range support");
    }

    #[test]
    fn a_range_from_elsewhere_or_a_new_length_restarts() {
        let mut s = started(100);
        assert!(matches!(
            s.check_response(206, &h(&[("etag", "\"v1\""), ("content-range", "bytes 0-99/100")])),
            Resume::StartOver { body_from_zero: false, .. }
        ));
        assert!(matches!(
            s.check_response(206, &h(&[("etag", "\"v1\""), ("content-range", "bytes 10-199/200")])),
            Resume::StartOver { body_from_zero: false, .. }
        ));
        assert!(matches!(s.check_response(206, &h(&[("etag", "\"v1\"")])), Resume::StartOver { .. }));
    }

    /// A copy at `offset` after a first answer with these validators.
    fn resumed_at(offset: u64, etag: Option<&str>, length: Option<u64>) -> CopyState {
        let mut s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        s.offset = offset;
        s.parts_stored = 1;
        s.validators = Some(Validators { etag: etag.map(str::to_string), last_modified: None, length });
        s
    }

    #[test]
    fn a_416_at_the_offset_completes_only_the_same_object_of_that_length() {
        // The object was 100 bytes; 60 are stored; it now holds 60: a shorter replacement.
        let mut s = resumed_at(60, Some("\"v1\""), Some(100));
        let why = s.check_unsatisfiable(&h(&[("content-range", "bytes */60"), ("etag", "\"v1\"")])).unwrap_err();
        assert!(why.contains("held 100 bytes") && why.contains("replaced"), "{why}");
        assert_eq!(s.validators.as_ref().and_then(|v| v.length), Some(100), "nothing recorded");
        // Unsized first answer: the same ETag proves the object; another one or none does not.
        let mut s = resumed_at(60, Some("\"v1\""), None);
        assert_eq!(s.check_unsatisfiable(&h(&[("content-range", "bytes */60"), ("etag", "\"v1\"")])), Ok(()));
        assert_eq!(s.validators.as_ref().and_then(|v| v.length), Some(60));
        assert!(s.all_stored());
        let mut s = resumed_at(60, Some("\"v1\""), None);
        let why = s.check_unsatisfiable(&h(&[("content-range", "bytes */60"), ("etag", "\"v2\"")])).unwrap_err();
        assert!(why.contains("ETag changed"), "{why}");
        let mut s = resumed_at(60, Some("\"v1\""), None);
        assert!(s.check_unsatisfiable(&h(&[("content-range", "bytes */60")])).is_err(), "unconfirmed");
        let mut s = resumed_at(60, None, None);
        assert!(s.check_unsatisfiable(&h(&[("content-range", "bytes */60")])).is_err(), "nothing identifies it");
        // Another length, or none said.
        let mut s = resumed_at(60, Some("\"v1\""), None);
        let why = s.check_unsatisfiable(&h(&[("content-range", "bytes */40"), ("etag", "\"v1\"")])).unwrap_err();
        assert!(why.contains("now holds 40 bytes"), "{why}");
        assert!(s.check_unsatisfiable(&h(&[("content-range", "bytes */*")])).is_err());
        assert!(s.check_unsatisfiable(&[]).is_err());
    }

    #[test]
    fn a_206_of_unknown_total_after_an_unsized_200_restarts_and_runs_to_the_end() {
        let mut s = resumed_at(10, Some("\"v1\""), None);
        match s.check_response(206, &h(&[("etag", "\"v1\""), ("content-range", "bytes 10-99/*")])) {
            Resume::StartOver { reason, body_from_zero: false } => assert!(reason.contains("length"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(s.no_ranges, "the copy again from zero cannot stop before its end");
        // A total, or a length known from the first answer, is checked at the end: it continues.
        let mut s = resumed_at(10, Some("\"v1\""), None);
        assert_eq!(
            s.check_response(206, &h(&[("etag", "\"v1\""), ("content-range", "bytes 10-99/100")])),
            Resume::Continue
        );
        assert_eq!(s.validators.as_ref().and_then(|v| v.length), Some(100));
        let mut s = resumed_at(10, Some("\"v1\""), Some(100));
        assert_eq!(
            s.check_response(206, &h(&[("etag", "\"v1\""), ("content-range", "bytes 10-99/*")])),
            Resume::Continue
        );
    }

    #[test]
    fn accept_ranges_none_makes_the_copy_run_to_its_end_from_the_first_answer() {
        let mut s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        let r = s.check_response(200, &h(&[("accept-ranges", "none"), ("content-length", "100")]));
        assert_eq!(r, Resume::Continue);
        assert!(s.no_ranges);
        let mut s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        s.check_response(200, &h(&[("accept-ranges", "bytes"), ("content-length", "100")]));
        assert!(!s.no_ranges);
    }

    #[test]
    fn a_copy_that_cannot_resume_gets_the_invocations_ceiling_not_the_slice_budget() {
        let t = TransferSettings { slice_time: Duration::from_secs(300), ..Default::default() };
        assert_eq!(t.slice_limit(false), Duration::from_secs(300) + SLICE_GRACE);
        assert_eq!(t.slice_limit(true), INVOCATION_WALL_CLOCK - INVOCATION_MARGIN);
        assert!(t.slice_limit(true) > Duration::from_secs(14 * 60), "close to the 15 minutes an alarm may run");
        let tiny = TransferSettings { slice_time: Duration::from_secs(1), ..Default::default() };
        assert_eq!(tiny.slice_limit(true), t.slice_limit(true), "whatever the slice budget");
        let longest = TransferSettings { slice_time: Duration::from_secs(600), ..Default::default() };
        assert!(longest.slice_limit(false) <= longest.slice_limit(true), "never past the invocation");
    }

    #[test]
    fn storage_writes_go_in_calls_of_at_most_128_keys_with_the_job_last() {
        let records: Vec<(String, String)> = (1..=300).map(|n| (format!("part:j:0:0:{n:05}"), "{}".into())).collect();
        let batches = progress_batches(records, Some(("job:j".into(), "{}".into())));
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![128, 128, 45]);
        assert!(batches.iter().all(|b| b.len() <= STORAGE_KEYS_PER_CALL));
        let last = batches.last().unwrap();
        assert_eq!(last.last().unwrap().0, "job:j", "the job is written after every record it counts");
        assert_eq!(batches.iter().flatten().filter(|(k, _)| k == "job:j").count(), 1);
        assert_eq!(batches.iter().flatten().count(), 301);
        assert_eq!(progress_batches(Vec::new(), Some(("job:j".into(), String::new()))).len(), 1);
        assert!(storage_batches(Vec::<u8>::new()).is_empty());
        assert_eq!(storage_batches((0..256).collect::<Vec<u32>>()).len(), 2);
    }

    #[test]
    fn a_replica_manifest_takes_the_primary_manifests_part_hashes_by_key() {
        use crate::manifest::Artifact;
        let with = |key: &str, hashes: &[&str]| Artifact {
            parts: hashes.len().max(1) as u32,
            part_sha256: hashes.iter().map(|h| h.to_string()).collect(),
            ..Artifact::sample(key, "f", 10, "ab", "application/gzip")
        };
        let mut replica = vec![with("s/f/a.gz", &[]), with("s/f/b.gz", &[]), with("s/f/c.gz", &[])];
        let primary = vec![with("s/f/b.gz", &["b1", "b2"]), with("s/f/a.gz", &["a1"])];
        copy_part_hashes(&mut replica, &primary);
        assert_eq!(replica[0].part_sha256, vec!["a1"]);
        assert_eq!(replica[1].part_sha256, vec!["b1", "b2"]);
        assert!(replica[2].part_sha256.is_empty(), "a file the primary does not list keeps none");
    }

    #[test]
    fn final_part_hashes_come_from_the_newest_set_of_records() {
        let rec = |gen: u32, n: u16, sha: &str| {
            let r = PartRecord { number: n, etag: "e".into(), size: 5, sha256: sha.into() };
            (format!("part:j:0:{gen}:{n:05}"), serde_json::to_string(&r).unwrap())
        };
        let entries = vec![
            rec(0, 1, "old1"),
            rec(0, 2, "old2"),
            rec(0, 3, "old3"),
            rec(1, 1, "a"),
            rec(1, 2, "b"),
            rec(1, 3, "x"),
        ];
        assert_eq!(
            final_part_hashes(&entries, 2).unwrap(),
            vec!["a".to_string(), "b".into()],
            "a leftover past the count"
        );
        assert!(final_part_hashes(&entries, 4).is_err(), "a missing record");
        assert!(final_part_hashes(&[rec(0, 2, "b")], 1).is_err(), "numbered from 1");
        assert!(final_part_hashes(&[("part:j:0:0:00001".into(), "{".into())], 1).is_err());
        assert_eq!(final_part_hashes(&[], 0).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn restart_clears_progress_and_hands_back_the_upload() {
        let mut s = started(100);
        s.upload_id = Some("u1".into());
        assert_eq!(s.restart("because".into()), Some("u1".into()));
        assert_eq!((s.offset, s.parts_stored, s.restarts), (0, 0, 1));
        assert_eq!(s.part_key("j1", 7), "part:j1:0:1:00007", "a restart starts a fresh set of records");
        assert_eq!(s.last_restart.as_deref(), Some("because"));
        assert_eq!(s.hash_state, CopyState::new("k".into(), 0, Timestamp::from_secs(0)).hash_state);
    }

    #[test]
    fn a_content_encoded_answer_is_refused_not_stored_decoded() {
        let mut s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        let Resume::Refuse(why) = s.check_response(200, &h(&[("content-encoding", "gzip"), ("content-length", "5")]))
        else {
            panic!("an encoded body must be refused");
        };
        assert!(why.contains("Content-Encoding: gzip"), "{why}");
        assert!(s.validators.is_none());
        let mut s = CopyState::new("k".into(), 0, Timestamp::from_secs(0));
        assert_eq!(
            s.check_response(200, &h(&[("content-encoding", "identity"), ("content-length", "5")])),
            Resume::Continue
        );
        assert_eq!(s.validators.unwrap().length, Some(5));
    }

    fn gzip_of(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn gzip_check_accepts_whole_files_and_refuses_cut_or_damaged_ones() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 7 + i / 1000) as u8).collect();
        let mut two_members = gzip_of(&data);
        two_members.extend(gzip_of(b"second member"));
        let feed = |bytes: &[u8]| -> Result<(), String> {
            let mut check = GzipCheck::default();
            for chunk in bytes.chunks(4096) {
                check.update(chunk)?;
            }
            check.finish()
        };
        assert_eq!(feed(&two_members), Ok(()));
        let whole = gzip_of(&data);
        for cut in [whole.len() - 1, whole.len() - 8, whole.len() / 2, 10] {
            let err = feed(&whole[..cut]).unwrap_err();
            assert!(err.contains("ends before its gzip trailer") || err.contains("not valid"), "cut {cut}: {err}");
        }
        let mut bad_crc = whole.clone();
        let at = bad_crc.len() - 6;
        bad_crc[at] ^= 0xff;
        assert!(feed(&bad_crc).is_err(), "a wrong CRC-32 is refused");
        assert_eq!(feed(&[]), Err("is empty".into()));
    }

    #[test]
    fn hash_state_round_trips_mid_stream() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut a = Sha256::new();
        a.update(&data[..33_333]);
        let saved = save_hasher(&a);
        assert!(saved.len() < 300, "{}", saved.len());
        let mut b = load_hasher(&saved).unwrap();
        b.update(&data[33_333..]);
        assert_eq!(b.finalize(), Sha256::digest(&data));
        assert!(load_hasher("zz").is_err());
        assert!(load_hasher("00").is_err());
    }

    #[test]
    fn refused_signed_urls_count_as_expired() {
        assert!(signed_url_expired(
            403,
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
        ));
        assert!(signed_url_expired(400, "<Error><Code>ExpiredToken</Code></Error>"));
        assert!(!signed_url_expired(400, "bad request"));
        assert!(signed_url_expired(404, "NoSuchKey"), "D1's expired URLs may answer 404");
        assert!(!signed_url_expired(500, "oops"));
    }

    #[test]
    fn files_that_cannot_be_what_their_name_says_are_refused() {
        assert!(wrong_start("volume.tgz", &[0x1f, 0x8b, 8, 0]).is_none());
        let html = wrong_start("database.gz", b"<!DOCTYPE html><title>Sign in</title>").unwrap();
        assert!(html.contains("database.gz is not gzip data") && html.contains("DOCTYPE"), "{html}");
        assert!(wrong_start("db.sql", b"PRAGMA defer_foreign_keys=TRUE;").is_none());
        assert!(wrong_start("db.sql", b"  <html><body>login</body></html>").is_some());
        assert!(wrong_start("db.sql", D1_DUMP_START.as_bytes()).is_none(), "an empty database's dump");
        let text = wrong_start("db.sql", b"{\"error\":\"internal\"}").unwrap();
        assert!(text.contains("does not start with") && text.contains("error"), "{text}");
        assert!(wrong_start("g01.json.gz", b"{").is_none(), "too short to judge");
    }

    #[test]
    fn part_records_must_add_up_before_completing() {
        let mut s = started(100);
        let rec = |n: u16, size: u64| PartRecord { number: n, etag: format!("e{n}"), size, sha256: String::new() };
        assert!(s.check_parts(&[rec(1, 10)]).is_ok());
        assert!(s.check_parts(&[]).is_err());
        assert!(s.check_parts(&[rec(2, 10)]).is_err());
        s.record_part(&rec(2, 5), s.hash_state.clone());
        assert!(s.check_parts(&[rec(1, 10), rec(2, 5)]).is_ok());
        assert!(s.check_parts(&[rec(1, 10), rec(2, 6)]).is_err());
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, 99, Some(100))));
        assert_eq!(parse_content_range("bytes 10-99/*"), Some((10, 99, None)));
        assert_eq!(parse_content_range("bytes 10-99/50"), None);
        assert_eq!(parse_content_range("bytes 99-10/100"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }

    #[test]
    fn all_stored_once_the_offset_reaches_the_length() {
        let mut s = started(10);
        assert!(s.all_stored());
        s.validators = None;
        assert!(!s.all_stored());
    }

    #[test]
    fn slices_end_on_bytes_or_time() {
        let t = TransferSettings { slice_bytes: 100, slice_time: Duration::from_secs(10), ..Default::default() };
        assert!(!t.slice_done(99, Duration::from_secs(9)));
        assert!(t.slice_done(100, Duration::ZERO));
        assert!(t.slice_done(0, Duration::from_secs(10)));
    }

    #[test]
    fn peak_memory_counts_parts_in_flight_plus_one() {
        let t = TransferSettings { part_size: 8 * MIB, parts_in_flight: 4, ..Default::default() };
        assert_eq!(t.peak_memory(), 40 * MIB + MEMORY_OVERHEAD);
    }

    /// A source's bytes as a copy would read them: `reads` chunks of distinct content.
    fn reads_of(tag: u8, reads: usize, size: usize) -> Vec<Vec<u8>> {
        (0..reads).map(|i| (0..size).map(|j| tag ^ (i as u8).wrapping_mul(31) ^ (j as u8)).collect()).collect()
    }

    #[test]
    fn copies_sharing_a_thread_each_hash_exactly_their_own_bytes() {
        // Four copies take turns read by read, as Durable Objects sharing an isolate interleave:
        // each stages a read into its own buffer and hashes it in the same call.
        let sources: Vec<Vec<Vec<u8>>> =
            (0..4u8).map(|tag| reads_of(tag.wrapping_mul(67), 6, 1000 + tag as usize)).collect();
        let mut copies: Vec<Digests> =
            (0..4).map(|i| Digests::new(Sha256::new(), (i % 2 == 0).then(crate::dump::Tally::default))).collect();
        for read in 0..6 {
            for (copy, source) in copies.iter_mut().zip(&sources) {
                let bytes = &source[read];
                copy.absorb_with(bytes.len(), |staged| staged.copy_from_slice(bytes)).unwrap();
            }
        }
        for (i, (copy, source)) in copies.iter().zip(&sources).enumerate() {
            let whole: Vec<u8> = source.concat();
            assert_eq!(copy.sha256().to_vec(), Sha256::digest(&whole).to_vec(), "copy {i}");
            if i % 2 == 0 {
                let mut tally = crate::dump::Tally::default();
                tally.update(&whole);
                assert_eq!(copy.tally(), Some(tally.finish()), "copy {i}");
            } else {
                assert_eq!(copy.tally(), None);
            }
        }
    }

    #[test]
    fn a_shorter_read_after_a_longer_one_hashes_only_its_own_length() {
        let mut copy = Digests::new(Sha256::new(), None);
        copy.absorb_with(8, |staged| staged.copy_from_slice(b"abcdefgh")).unwrap();
        copy.absorb_with(2, |staged| staged.copy_from_slice(b"ij")).unwrap();
        assert_eq!(copy.sha256().to_vec(), Sha256::digest(b"abcdefghij").to_vec());
    }

    #[test]
    fn saved_digests_resume_as_one_stream_and_a_reset_starts_from_zero() {
        let mut first = Digests::new(Sha256::new(), Some(crate::dump::Tally::default()));
        first.absorb(b"INSERT INTO \"t\" VALUES(1);\n").unwrap();
        let tally = first.saved_tally().and_then(|t| crate::dump::Tally::load(&t));
        let mut resumed = Digests::new(load_hasher(&first.saved_hasher()).unwrap(), tally);
        resumed.absorb_with(27, |staged| staged.copy_from_slice(b"INSERT INTO \"t\" VALUES(2);\n")).unwrap();
        let whole = b"INSERT INTO \"t\" VALUES(1);\nINSERT INTO \"t\" VALUES(2);\n";
        assert_eq!(resumed.sha256().to_vec(), Sha256::digest(whole).to_vec());
        assert_eq!(resumed.tally().unwrap().1.get("t"), Some(&2));
        resumed.reset();
        assert_eq!(resumed.sha256().to_vec(), Sha256::digest(b"").to_vec());
        assert_eq!(resumed.tally().unwrap().1.get("t"), None);
    }

    #[test]
    fn digests_run_the_gzip_check_on_the_bytes_they_hash() {
        let file = gzip_of(b"hello gzip");
        let mut whole = Digests::new(Sha256::new(), None);
        whole.check_gzip();
        whole.absorb_with(file.len(), |staged| staged.copy_from_slice(&file)).unwrap();
        assert_eq!(whole.take_gzip().map(GzipCheck::finish), Some(Ok(())));
        let mut cut = Digests::new(Sha256::new(), None);
        cut.check_gzip();
        cut.absorb_with(file.len() - 4, |staged| staged.copy_from_slice(&file[..file.len() - 4])).unwrap();
        assert!(cut.take_gzip().unwrap().finish().is_err());
        let mut plain = Digests::new(Sha256::new(), None);
        plain.absorb(b"not gzip").unwrap();
        assert!(plain.take_gzip().is_none(), "no check unless asked");
    }
}
