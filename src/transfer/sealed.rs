//! Encrypted copies: every artifact of a source with `age_recipients` is encrypted to them in the
//! standard age v1 format ([`crate::encryption`]) before it leaves the Worker, so R2 holds only
//! what the key holders can read, and `age -d -i key.txt` opens any file.
//!
//! An encrypted copy is a generated file (its resume points are its slices' ends): [`Sealed`]
//! wraps the plaintext's source, a download read by `Range` pages or a file Ferry generates
//! itself, and emits the age file. What a slice leaves for the next one is its cursor
//! ([`SealCursor`]): the encryptor (the payload key and at most one 64 KiB chunk of plaintext not
//! yet sealed), the plaintext's SHA-256 (and a SQL dump's MD5 and row tally) so far, where the
//! download stands and the inner generator's own cursor. It lives in the job's record in the
//! source's own Durable Object storage, only while the copy runs: the engine drops the copy's
//! state when the file is stored ([`crate::job`]), and nothing else ever holds the key.
//!
//! What R2 holds is checked as any other file (size and SHA-256 of the encrypted bytes, so
//! `verify` needs no key); the artifact's `details.encryption` records what it holds inside: the
//! plaintext's size and SHA-256, and for a SQL dump its MD5 and row counts.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{load_hasher, parse_content_range, CopyState, Digests, Generator, Validators};
use crate::encryption::{Encryptor, Envelope, Recipient, NONCE_SIZE};
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::time::Timestamp;

/// The suffix of an encrypted artifact's file name (`dump.sql` is stored as `dump.sql.age`).
pub const SUFFIX: &str = ".age";
/// The content type an encrypted artifact is stored with.
pub const CONTENT_TYPE: &str = "application/octet-stream";
/// Bytes a download page asks for: the API body cap (4 MiB), so a GiB takes 256 requests.
pub const DOWNLOAD_PAGE: u64 = 4 * 1024 * 1024;
/// What an encrypted copy holds in wasm memory besides the copy's part buffers: a page as read,
/// its plaintext and ciphertext on the way, and what waits to be pushed (measured peak: 25 MiB
/// with 4 MiB pages, `bench/transfer.py --encrypt`).
pub const MEMORY: u64 = 7 * DOWNLOAD_PAGE;
/// The smallest page a download's page size is halved to.
const MIN_PAGE: u64 = 64 * 1024;

/// Random bytes an envelope needs: the file key, the payload nonce, one ephemeral secret per
/// recipient.
pub fn random_len(recipients: usize) -> usize {
    16 + NONCE_SIZE + 32 * recipients
}

/// A fresh envelope for one file, from `random` ([`random_len`] bytes, fresh for every file).
pub fn envelope(recipients: &[Recipient], random: &[u8]) -> Result<Envelope, StepError> {
    let bad = || StepError::permanent("encrypting: not enough random bytes for the file's keys");
    if random.len() < random_len(recipients.len()) {
        return Err(bad());
    }
    let (file_key, rest) = random.split_at(16);
    let (nonce, rest) = rest.split_at(NONCE_SIZE);
    let ephemeral: Vec<[u8; 32]> = rest
        .chunks_exact(32)
        .take(recipients.len())
        .map(|c| c.try_into().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let file_key: [u8; 16] = file_key.try_into().map_err(|_| bad())?;
    let nonce: [u8; NONCE_SIZE] = nonce.try_into().map_err(|_| bad())?;
    Envelope::new(recipients, &file_key, &ephemeral, &nonce)
        .map_err(|e| StepError::permanent(format!("encrypting: {e}")))
}

/// Where an encrypted copy's plaintext comes from.
pub enum Plain {
    /// A download, read by `Range` pages (the plain GET; the pages add `Range` and `If-Range`).
    Download(HttpRequest),
    /// A file Ferry generates itself.
    Generated(Box<dyn Generator>),
}

/// What an encrypted copy carries from one slice to the next (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealCursor {
    /// The encryption so far; its key and buffered plaintext are `secret_` fields.
    pub encryptor: Encryptor,
    /// Plaintext bytes read so far.
    pub plain_size: u64,
    /// The plaintext's SHA-256 state so far.
    pub plain_hash: String,
    /// A SQL dump's MD5 and row tally so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tally: Option<crate::dump::TallyState>,
    /// A download: what the first page said of the object, checked on every later page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validators: Option<Validators>,
    /// A download: bytes per page.
    #[serde(default)]
    pub page: u64,
    /// A generated file: the inner generator's cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<Value>,
}

/// The generator of one encrypted file.
pub struct Sealed {
    plain: Plain,
    encryptor: Encryptor,
    plain_size: u64,
    digests: Digests,
    validators: Option<Validators>,
    page: u64,
    /// A download: every byte was read.
    read_all: bool,
    output: Vec<u8>,
    /// The provider's file name, whose first bytes a download's first page is checked against
    /// ([`super::wrong_start`]: a login page is never encrypted and stored as a dump).
    plain_name: Option<String>,
}

impl Sealed {
    /// A new encrypted file (its output begins with the header), or one resumed from `cursor`.
    /// `tally`: whether the plaintext is a SQL dump whose MD5 and row counts are recorded.
    pub fn new(
        plain: Plain,
        envelope: Option<&Envelope>,
        cursor: Option<SealCursor>,
        tally: bool,
    ) -> Result<Self, StepError> {
        let (encryptor, plain_size, hasher, tally_state, validators, page) = match cursor {
            Some(c) => (c.encryptor, c.plain_size, load_hasher(&c.plain_hash)?, c.tally, c.validators, c.page),
            None => {
                let envelope =
                    envelope.ok_or_else(|| StepError::permanent("encrypting: a new file needs its envelope"))?;
                let fresh = tally.then(crate::dump::TallyState::fresh);
                (Encryptor::new(envelope), 0, sha2::Sha256::default(), fresh, None, DOWNLOAD_PAGE)
            }
        };
        let tally = match tally_state.as_ref().map(crate::dump::Tally::load) {
            None => None,
            Some(Some(t)) => Some(t),
            Some(None) => {
                return Err(StepError::permanent("the encrypted copy's saved MD5 and row counts are corrupt"))
            }
        };
        Ok(Self {
            plain,
            encryptor,
            plain_size,
            digests: Digests::new(hasher, tally),
            validators,
            page: page.max(MIN_PAGE),
            read_all: false,
            output: Vec::new(),
            plain_name: None,
        })
    }

    /// Checks a download's first bytes as the provider's file `name` must start.
    pub fn checking_start(mut self, name: &str) -> Self {
        self.plain_name = Some(name.to_string());
        self
    }

    /// Takes plaintext: hashed as it is, then encrypted into the output.
    fn feed(&mut self, plaintext: &[u8]) -> Result<(), StepError> {
        self.digests.absorb(plaintext).map_err(StepError::permanent)?;
        self.plain_size += plaintext.len() as u64;
        let sealed = self.encryptor.push(plaintext).map_err(|e| StepError::permanent(format!("encrypting: {e}")))?;
        self.output.extend_from_slice(&sealed);
        Ok(())
    }

    /// A download page's answer: the bytes at the offset asked for, of the same object.
    fn on_page(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<(), StepError> {
        let offset = self.plain_size;
        let length = match resp.status {
            // The whole object: only when it was asked from its start (a server without ranges).
            200 if offset == 0 => {
                self.read_all = true;
                Some(resp.body.len() as u64)
            }
            206 => {
                let range = resp.header("content-range").and_then(parse_content_range);
                let Some((start, end, total)) = range else {
                    return Err(StepError::permanent(format!(
                        "the download answered 206 without a usable Content-Range ({:?})",
                        resp.header("content-range")
                    )));
                };
                if start != offset || end + 1 != offset + resp.body.len() as u64 {
                    return Err(StepError::permanent(format!(
                        "the download answered bytes {start}-{end} with {} bytes for a page at {offset}",
                        resp.body.len()
                    )));
                }
                // Without a total (`bytes a-b/*`), a page shorter than asked is the last.
                self.read_all = total.map_or((resp.body.len() as u64) < self.page, |t| end + 1 >= t);
                total
            }
            // At the end: an object whose length is a multiple of the page, or an empty one.
            416 if unsatisfied_length(resp) == Some(offset) => {
                self.read_all = true;
                if self.validators.is_none() {
                    self.validators = Some(Validators { length: Some(0), ..Validators::default() });
                }
                return Ok(());
            }
            200 => {
                return Err(StepError::permanent(format!(
                    "the download answered a range request at byte {offset} with the whole object (HTTP 200): the \
                     object changed, or its server stopped honouring ranges; an encrypted copy resumes only by \
                     ranges, so the job fails and the next run starts over"
                )))
            }
            status => {
                return Err(crate::http::status_error(
                    resp,
                    now,
                    format!("the download answered HTTP {status}: {}", resp.snippet(200)),
                ))
            }
        };
        let seen = Validators {
            etag: resp.header("etag").map(str::to_string),
            last_modified: resp.header("last-modified").map(str::to_string),
            length,
        };
        match &self.validators {
            None => self.validators = Some(seen),
            Some(first) => {
                if let Some(why) = first.changed(&seen) {
                    return Err(StepError::permanent(format!(
                        "the download changed during the encrypted copy ({why}); the job fails and the next run \
                         starts over"
                    )));
                }
            }
        }
        if let (0, Some(name)) = (offset, &self.plain_name) {
            if let Some(why) = super::wrong_start(name, &resp.body) {
                return Err(StepError::permanent(why));
            }
        }
        let body = resp.body.clone();
        self.feed(&body)
    }

    /// The plaintext's source, taken out for the slice's or the file's end (an empty download
    /// takes its place).
    fn take_plain(&mut self) -> Plain {
        std::mem::replace(&mut self.plain, Plain::Download(HttpRequest::get(String::new())))
    }

    fn cursor(&self, inner: Option<Value>) -> SealCursor {
        SealCursor {
            encryptor: self.encryptor.clone(),
            plain_size: self.plain_size,
            plain_hash: self.digests.saved_hasher(),
            tally: self.digests.saved_tally(),
            validators: self.validators.clone(),
            page: self.page,
            inner,
        }
    }
}

impl Generator for Sealed {
    fn next_request(&self) -> Option<HttpRequest> {
        match &self.plain {
            Plain::Download(base) => {
                if self.read_all {
                    return None;
                }
                let from = self.plain_size;
                let req = base
                    .clone()
                    .header("accept-encoding", "identity")
                    .header("range", format!("bytes={from}-{}", from + self.page - 1));
                Some(match self.validators.as_ref().and_then(Validators::if_range) {
                    Some(v) => req.header("if-range", v.to_string()),
                    None => req,
                })
            }
            Plain::Generated(inner) => inner.next_request(),
        }
    }

    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<(), StepError> {
        if matches!(self.plain, Plain::Download(_)) {
            return self.on_page(resp, now);
        }
        let Plain::Generated(inner) = &mut self.plain else { return Ok(()) };
        inner.on_response(resp, now)?;
        let out = inner.take_output();
        self.feed(&out)
    }

    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    fn shrink_page(&mut self, why: &str) -> Result<u32, StepError> {
        match &mut self.plain {
            Plain::Generated(inner) => inner.shrink_page(why),
            Plain::Download(_) => {
                if self.page <= MIN_PAGE {
                    return Err(StepError::permanent(format!(
                        "a download page of {} bytes is still too large: {why}",
                        self.page
                    )));
                }
                self.page = (self.page / 2).max(MIN_PAGE);
                Ok(u32::try_from(self.page).unwrap_or(u32::MAX))
            }
        }
    }

    fn end_slice(mut self: Box<Self>, state: &mut CopyState) -> Result<Vec<u8>, StepError> {
        let plain = self.take_plain();
        let inner = match plain {
            Plain::Download(_) => None,
            Plain::Generated(inner) => {
                let mut scratch = state.clone();
                scratch.cursor = None;
                let rest = inner.end_slice(&mut scratch)?;
                self.feed(&rest)?;
                state.warnings = scratch.warnings;
                scratch.cursor
            }
        };
        state.set_cursor(&self.cursor(inner))?;
        Ok(std::mem::take(&mut self.output))
    }

    fn finish(mut self: Box<Self>) -> Result<(Vec<u8>, Value), StepError> {
        let plain = self.take_plain();
        let inner_details = match plain {
            Plain::Download(_) => None,
            Plain::Generated(inner) => {
                let (rest, details) = inner.finish()?;
                self.feed(&rest)?;
                Some(details)
            }
        };
        let last = self.encryptor.finish().map_err(|e| StepError::permanent(format!("encrypting: {e}")))?;
        self.output.extend_from_slice(&last);
        let mut plaintext = json!({ "size": self.plain_size, "sha256": hex::encode(self.digests.sha256()) });
        if let Some((md5, rows)) = self.digests.tally() {
            plaintext["md5"] = json!(md5);
            plaintext["row_counts"] = json!(rows);
        }
        let mut details = match inner_details {
            Some(Value::Object(map)) => Value::Object(map),
            _ => json!({}),
        };
        details["encryption"] = json!({ "format": "age-v1", "plaintext": plaintext });
        Ok((std::mem::take(&mut self.output), details))
    }

    fn record_end(&self, state: &mut CopyState) {
        if let Plain::Generated(inner) = &self.plain {
            inner.record_end(state);
        }
    }

    fn expired(&self, resp: &HttpResponse) -> Option<String> {
        // Only a signed URL (a GET without credentials) expires; a refused credential is not it.
        let Plain::Download(base) = &self.plain else { return None };
        if base.header_value("authorization").is_some() {
            return None;
        }
        let text: String = String::from_utf8_lossy(&resp.body).chars().take(200).collect();
        super::signed_url_expired(resp.status, &text)
            .then(|| format!("a download page was refused (HTTP {}): {}", resp.status, text.trim()))
    }
}

/// The length a 416's `Content-Range: bytes */<length>` gives.
fn unsatisfied_length(resp: &HttpResponse) -> Option<u64> {
    resp.header("content-range")?.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

/// What an artifact's `details.encryption` says: whether it is encrypted.
pub fn is_encrypted(artifact: &crate::manifest::Artifact) -> bool {
    artifact.details.as_ref().and_then(|d| d.get("encryption")).is_some()
}

#[cfg(test)]
mod tests;
