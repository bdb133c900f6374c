//! Verification of a committed backup, as its own job: read every artifact back from R2,
//! re-hash it, compare with the manifest.
//!
//! The copy path writes each byte once and does not read it back; proving that what R2 holds is
//! what the manifest says is this job's work, on demand (`POST /v1/sources/{name}/verify`) or on
//! the source's `verify_schedule`. It is sliced like a copy: [`VerifyState`] says which artifact
//! and offset the next slice reads from and carries the serialized SHA-256 state across slices.
//! The outcome is written next to the backup as [`VERIFICATION_NAME`], so listing a source's
//! backups shows each one's last verification.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::StepError;
use crate::identity::JobId;
use crate::manifest::Manifest;
use crate::time::Timestamp;
use crate::transfer::{load_hasher, save_hasher};

/// Name of the verification record in a backup's folder.
pub const VERIFICATION_NAME: &str = "verification.json";

/// One file to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// R2 key.
    pub key: String,
    /// Size the manifest records.
    pub size: u64,
    /// SHA-256 the manifest records.
    pub sha256: String,
}

/// Where a verify job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyState {
    /// The manifest being verified; `None` until the first slice picks the newest.
    pub manifest_key: Option<String>,
    /// The files the manifest lists, once read.
    pub files: Vec<Expected>,
    /// Whether the manifest was read.
    pub resolved: bool,
    /// The file being read.
    pub index: usize,
    /// Bytes of it hashed so far.
    pub offset: u64,
    /// Hex of the serialized SHA-256 state over `0..offset` of the current file.
    pub hash_state: String,
    /// Files that do not match, with why.
    pub mismatches: Vec<String>,
    /// Bytes read in all.
    pub bytes_read: u64,
    /// Slices run.
    pub slices: u32,
}

/// The outcome stored next to a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The verify job.
    pub job_id: JobId,
    /// When the last byte was checked.
    pub verified_at: Timestamp,
    /// `ok` or `mismatch`.
    pub outcome: String,
    /// Files checked.
    pub files: usize,
    /// Bytes read back.
    pub bytes: u64,
    /// What did not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<String>,
}

impl VerifyState {
    /// Verification of `manifest_key`, or of the newest backup when `None`.
    pub fn new(manifest_key: Option<String>) -> Self {
        Self {
            manifest_key,
            files: Vec::new(),
            resolved: false,
            index: 0,
            offset: 0,
            hash_state: save_hasher(&Sha256::new()),
            mismatches: Vec::new(),
            bytes_read: 0,
            slices: 0,
        }
    }

    /// Takes the manifest's list of files.
    pub fn resolve(&mut self, manifest_key: String, manifest: &Manifest) {
        self.manifest_key = Some(manifest_key);
        self.files = manifest
            .artifacts
            .iter()
            .map(|a| Expected { key: a.key.clone(), size: a.size, sha256: a.sha256.clone() })
            .collect();
        self.resolved = true;
    }

    /// The file to read next, if any.
    pub fn current(&self) -> Option<&Expected> {
        self.files.get(self.index)
    }

    /// True once every file was checked.
    pub fn done(&self) -> bool {
        self.resolved && self.index >= self.files.len()
    }

    /// The current file's hasher.
    pub fn hasher(&self) -> Result<Sha256, StepError> {
        load_hasher(&self.hash_state)
    }

    /// Records that `hasher` now covers `read` more bytes of the current file.
    pub fn advance(&mut self, hasher: &Sha256, read: u64) {
        self.offset += read;
        self.bytes_read += read;
        self.hash_state = save_hasher(hasher);
    }

    /// Ends the current file: the object's stored size (`None` when it is missing) and the hash
    /// of the bytes read. Moves on to the next file.
    pub fn finish_file(&mut self, stored_size: Option<u64>, hasher: Sha256) {
        let Some(expected) = self.files.get(self.index).cloned() else { return };
        match stored_size {
            None => self.mismatches.push(format!("{}: the object is missing", expected.key)),
            Some(size) if size != expected.size => self
                .mismatches
                .push(format!("{}: R2 holds {size} bytes, the manifest says {}", expected.key, expected.size)),
            Some(_) => {
                let got = hex::encode(hasher.finalize());
                if got != expected.sha256 {
                    self.mismatches
                        .push(format!("{}: SHA-256 is {got}, the manifest says {}", expected.key, expected.sha256));
                }
            }
        }
        self.index += 1;
        self.offset = 0;
        self.hash_state = save_hasher(&Sha256::new());
    }

    /// The record to store next to the backup.
    pub fn verification(&self, job_id: &JobId, now: Timestamp) -> Verification {
        Verification {
            job_id: job_id.clone(),
            verified_at: now,
            outcome: if self.mismatches.is_empty() { "ok" } else { "mismatch" }.into(),
            files: self.files.len(),
            bytes: self.bytes_read,
            mismatches: self.mismatches.clone(),
        }
    }
}

/// The key of the verification record of the backup whose manifest is `manifest_key`.
pub fn verification_key(manifest_key: &str) -> String {
    match manifest_key.rsplit_once('/') {
        Some((folder, _)) => format!("{folder}/{VERIFICATION_NAME}"),
        None => VERIFICATION_NAME.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Trigger;
    use crate::manifest::Artifact;

    fn manifest(files: &[(&str, &[u8])]) -> Manifest {
        Manifest {
            source: "s".into(),
            kind: "dxp".into(),
            job_id: JobId::new("0123456789abcdef"),
            trigger: Trigger::Cron,
            started_at: Timestamp::from_secs(0),
            scheduled_for: None,
            finished_at: Timestamp::from_secs(1),
            provider: serde_json::json!({}),
            artifacts: files
                .iter()
                .map(|(k, body)| {
                    Artifact::sample(*k, *k, body.len() as u64, hex::encode(Sha256::digest(body)), "application/gzip")
                })
                .collect(),
        }
    }

    /// Reads `stored` in `chunk`-byte slices, persisting the state as JSON between them.
    fn run(state: &mut VerifyState, stored: &[(&str, Option<&[u8]>)], chunk: usize) {
        while let Some(file) = state.current().cloned() {
            let body = stored.iter().find(|(k, _)| *k == file.key).and_then(|(_, b)| *b);
            let Some(body) = body else {
                state.finish_file(None, Sha256::new());
                continue;
            };
            let mut hasher = state.hasher().unwrap();
            let from = state.offset as usize;
            let to = (from + chunk).min(body.len());
            hasher.update(&body[from..to]);
            state.advance(&hasher, (to - from) as u64);
            *state = serde_json::from_str(&serde_json::to_string(state).unwrap()).unwrap();
            if state.offset as usize == body.len() {
                let hasher = state.hasher().unwrap();
                state.finish_file(Some(body.len() as u64), hasher);
            }
        }
    }

    #[test]
    fn an_intact_backup_verifies_across_many_slices() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let m = manifest(&[("s/f/a.gz", &a), ("s/f/b.gz", b"hello")]);
        let mut state = VerifyState::new(None);
        state.resolve("s/f/manifest.json".into(), &m);
        run(&mut state, &[("s/f/a.gz", Some(&a)), ("s/f/b.gz", Some(b"hello"))], 777);
        assert!(state.done());
        let v = state.verification(&JobId::new("00000000000000ff"), Timestamp::from_secs(9));
        assert_eq!((v.outcome.as_str(), v.files, v.bytes), ("ok", 2, 10_005));
    }

    #[test]
    fn an_altered_or_missing_object_is_named() {
        let m = manifest(&[("s/f/a.gz", b"original"), ("s/f/b.gz", b"x"), ("s/f/c.gz", b"abc")]);
        let mut state = VerifyState::new(Some("s/f/manifest.json".into()));
        state.resolve("s/f/manifest.json".into(), &m);
        run(&mut state, &[("s/f/a.gz", Some(b"0riginal")), ("s/f/b.gz", None), ("s/f/c.gz", Some(b"abcd"))], 3);
        let v = state.verification(&JobId::new("00000000000000ff"), Timestamp::from_secs(9));
        assert_eq!(v.outcome, "mismatch");
        assert_eq!(v.mismatches.len(), 3, "{:?}", v.mismatches);
        assert!(v.mismatches[0].starts_with("s/f/a.gz: SHA-256 is"), "{:?}", v.mismatches);
        assert_eq!(v.mismatches[1], "s/f/b.gz: the object is missing");
        assert_eq!(v.mismatches[2], "s/f/c.gz: R2 holds 4 bytes, the manifest says 3");
    }

    #[test]
    fn the_record_lives_next_to_the_manifest() {
        assert_eq!(
            verification_key("src/2026-11-28T000000Z-0123456789abcdef/manifest.json"),
            "src/2026-11-28T000000Z-0123456789abcdef/verification.json"
        );
    }
}
