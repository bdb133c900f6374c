//! The second copy: a committed backup copied into another R2 bucket, or a bucket of an
//! S3-compatible service outside Cloudflare ([`crate::s3`]).
//!
//! A source with a `replica` table (`replica = { bucket_binding = "BACKUPS_REPLICA" }`, or
//! `{ endpoint, region, bucket, credentials_secret }`) gets, after every committed export, a
//! replicate job queued as the source's next job. It copies each file of the backup from the
//! primary bucket into the replica bucket (named in jobs by [`ReplicaConfig::name`]), at the same
//! key, sliced and resumable like any copy (the bytes come from ranged R2 reads instead of a
//! download), hashes what it wrote, and compares every file's size and SHA-256 with the primary
//! manifest. Its own manifest, the primary's plus a [`ReplicaOf`] note, is written last, so a
//! folder of the replica bucket is a backup exactly when the primary's was and every byte matched.
//!
//! A mismatch or a failure fails the replicate job (a `failed` alert, `task: "replicate"`) and
//! deletes what it wrote; it never fails or undoes the primary backup.
//!
//! A binding's name says nothing about its bucket: two bindings can name one bucket. So before it
//! writes anything, a replicate job proves the replica is another bucket ([`Identity`]): it writes
//! a probe object through the replica's binding, looks for it through the primary's, and deletes
//! it ([`ReplicaProbe`], [`judge_probe`]). Seen through both, the two are one bucket: the job
//! fails naming the binding, and touches nothing else. Only a job whose replica was proven
//! distinct ever cleans up a folder after a failure (`Job::fail`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fields::FieldError;
use crate::identity::JobId;
use crate::manifest::{Artifact, Manifest};
use crate::s3::S3Config;
use crate::time::Timestamp;

/// The binding of the primary bucket, which a replica may not name.
pub const PRIMARY_BINDING: &str = "BACKUPS";

/// Where the probe objects go: under the reserved `_ferry/` prefix, which no source folder can be
/// (`crate::manifest::parse_folder`) and the sweep leaves alone.
pub const PROBE_PREFIX: &str = "_ferry/replica-probe/";

/// What a replicate job knows about its replica bucket being another bucket than the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// Not proven yet (a job recorded before the probe existed reads as this too): nothing may be
    /// written to, or deleted from, the replica bucket.
    #[default]
    Unproven,
    /// A probe written through the replica's binding was not seen through the primary's.
    Distinct,
}

/// One probe of the replica bucket's identity, for the runtime to execute: write `token` at `key`
/// through the replica's binding, read `key` through the primary's, delete it through the
/// replica's, and hand what the primary read gave to [`judge_probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaProbe {
    /// The probe object's key (unique to the job and the attempt).
    pub key: String,
    /// The probe object's body.
    pub token: String,
}

/// What a probe showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// The probe was not seen through the primary's binding: the buckets are distinct.
    Distinct,
    /// The probe written through the replica's binding was read back through the primary's.
    SameBucket,
}

/// Judges a probe from what reading its key through the primary's binding gave (`None`: no such
/// object). Only the probe's own token counts as seen.
pub fn judge_probe(probe: &ReplicaProbe, primary_read: Option<&[u8]>) -> ProbeAnswer {
    match primary_read {
        Some(body) if body == probe.token.as_bytes() => ProbeAnswer::SameBucket,
        _ => ProbeAnswer::Distinct,
    }
}

/// The reason a replicate job fails when its replica is the primary bucket.
pub fn same_bucket_reason(binding: &str) -> String {
    if binding.starts_with(crate::s3::LABEL_SCHEME) {
        return format!(
            "the replica {binding} is the primary bucket {PRIMARY_BINDING} (a probe object written through its S3 \
             endpoint was read back through {PRIMARY_BINDING}); point replica.endpoint and replica.bucket at another \
             bucket. Nothing was written or deleted"
        );
    }
    format!(
        "the replica bucket bound as {binding} is the primary bucket {PRIMARY_BINDING} (a probe object written \
         through {binding} was read back through {PRIMARY_BINDING}); bind replica.bucket_binding to another \
         bucket in wrangler.toml's [[r2_buckets]]. Nothing was written or deleted"
    )
}

/// A source's `replica` table: another R2 bucket bound to the Worker, or a bucket of an
/// S3-compatible service outside Cloudflare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplicaConfig {
    /// `{ bucket_binding = "BACKUPS_REPLICA" }`: the Worker's R2 bucket binding that receives the
    /// second copy (declared in wrangler.toml).
    R2 {
        /// The binding's name.
        bucket_binding: String,
    },
    /// `{ endpoint, region, bucket, credentials_secret }`: an S3-compatible bucket
    /// ([`crate::s3::S3Config`]).
    S3(S3Config),
}

/// The fields of an R2 replica table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct R2Table {
    bucket_binding: String,
}

impl ReplicaConfig {
    /// Parses a `replica` table; errors name the field inside it (`bucket_binding`, `endpoint`, …).
    /// A table with `bucket_binding` names an R2 binding; one with `endpoint` an S3-compatible
    /// bucket.
    pub fn from_value(value: &Value) -> Result<Self, FieldError> {
        let Some(table) = value.as_object() else {
            return Err(FieldError::new(
                "",
                "must be a table, e.g. { bucket_binding = \"BACKUPS_REPLICA\" } or { endpoint = \"https://…\", region \
                 = \"…\", bucket = \"…\", credentials_secret = \"…\" }",
            ));
        };
        match (table.contains_key("bucket_binding"), table.contains_key("endpoint")) {
            (true, true) => {
                return Err(FieldError::new(
                    "endpoint",
                    "cannot be set with bucket_binding: a replica is an R2 binding or an S3-compatible bucket",
                ))
            }
            (false, true) => return S3Config::from_value(value).map(Self::S3),
            _ => {}
        }
        if table.is_empty() {
            return Err(FieldError::new(
                "bucket_binding",
                "is required (or endpoint, region, bucket and credentials_secret for an S3-compatible bucket)",
            ));
        }
        let R2Table { bucket_binding: b } =
            serde_path_to_error::deserialize(value.clone()).map_err(crate::fields::path_error)?;
        let valid = b.bytes().next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
            && b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
            && b.len() <= 64;
        if !valid {
            return Err(FieldError::new(
                "bucket_binding",
                format!("must be a binding name (letters, digits and '_', not starting with a digit), got {b:?}"),
            ));
        }
        if b == PRIMARY_BINDING {
            return Err(FieldError::new(
                "bucket_binding",
                format!("must name a bucket other than the primary {PRIMARY_BINDING}"),
            ));
        }
        Ok(Self::R2 { bucket_binding: b })
    }

    /// The replica's name in jobs, records and messages: the R2 binding, or the S3 bucket's label.
    pub fn name(&self) -> String {
        match self {
            Self::R2 { bucket_binding } => bucket_binding.clone(),
            Self::S3(config) => config.label(),
        }
    }

    /// The R2 binding, for an R2 replica.
    pub fn bucket_binding(&self) -> Option<String> {
        match self {
            Self::R2 { bucket_binding } => Some(bucket_binding.clone()),
            Self::S3(_) => None,
        }
    }

    /// The Worker secret holding the replica's key pair, for an S3 replica.
    pub fn secret_name(&self) -> Option<&str> {
        match self {
            Self::R2 { .. } => None,
            Self::S3(config) => Some(&config.credentials_secret),
        }
    }
}

/// What a replicate job copies: one committed backup, as its primary manifest describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The replica bucket's binding.
    pub binding: String,
    /// The primary manifest's key (the replica's manifest goes to the same key there).
    pub manifest_key: String,
    /// The primary manifest: the files to copy, in order, with their sizes and hashes.
    pub manifest: Manifest,
    /// Whether the replica bucket was proven to be another bucket than the primary.
    #[serde(default)]
    pub identity: Identity,
}

impl ReplicaState {
    /// The backup's folder (the same in both buckets).
    pub fn folder(&self) -> String {
        crate::manifest::folder_of(&self.manifest_key).unwrap_or_default().to_string()
    }

    /// The probe of attempt `attempt` of job `job`.
    pub fn probe(&self, job: &JobId, attempt: u32) -> ReplicaProbe {
        ReplicaProbe {
            key: format!("{PROBE_PREFIX}{job}-{attempt}"),
            token: format!("ferry replica probe: job {job}, attempt {attempt}, binding {}", self.binding),
        }
    }

    /// The next file to copy once `done` files are copied.
    pub fn file(&self, done: usize) -> Option<&Artifact> {
        self.manifest.artifacts.get(done)
    }

    /// Checks a file as the replica holds it against the primary manifest.
    pub fn check(&self, index: usize, copied: &Artifact) -> Result<(), String> {
        let Some(expected) = self.file(index) else {
            return Err(format!("the replica copied {} which the primary manifest does not list", copied.key));
        };
        if copied.key != expected.key {
            return Err(format!("the replica wrote {} where {} was expected", copied.key, expected.key));
        }
        if copied.size != expected.size {
            return Err(format!(
                "replica of {}: {} bytes were copied, the primary manifest says {}",
                expected.key, copied.size, expected.size
            ));
        }
        if copied.sha256 != expected.sha256 {
            return Err(format!(
                "replica of {}: SHA-256 of the copied bytes is {}, the primary manifest says {} (the primary \
                 object no longer matches its manifest)",
                expected.key, copied.sha256, expected.sha256
            ));
        }
        Ok(())
    }

    /// The replica's manifest: the primary's, with the note saying what it is a copy of.
    pub fn manifest(&self, job: &JobId, now: Timestamp) -> ReplicaManifest {
        ReplicaManifest {
            manifest: self.manifest.clone(),
            replica_of: ReplicaOf {
                bucket_binding: PRIMARY_BINDING.to_string(),
                manifest_key: self.manifest_key.clone(),
                replica_job_id: job.clone(),
                replicated_at: now,
            },
        }
    }
}

/// The note a replica's manifest carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaOf {
    /// The primary bucket's binding.
    pub bucket_binding: String,
    /// The primary manifest it copies.
    pub manifest_key: String,
    /// The replicate job.
    pub replica_job_id: JobId,
    /// When its manifest was written.
    pub replicated_at: Timestamp,
}

/// A replica's manifest: every field of the primary's (so it reads as a [`Manifest`]) and
/// `replica_of`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaManifest {
    /// The primary manifest, unchanged.
    #[serde(flatten)]
    pub manifest: Manifest,
    /// What it is a copy of.
    pub replica_of: ReplicaOf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_replica_table_names_a_binding_other_than_the_primary() {
        let c = ReplicaConfig::from_value(&json!({ "bucket_binding": "BACKUPS_EU" })).unwrap();
        assert_eq!(c.bucket_binding().as_deref(), Some("BACKUPS_EU"));
        assert_eq!(c.name(), "BACKUPS_EU");
        let e = ReplicaConfig::from_value(&json!({ "bucket_binding": "BACKUPS" })).unwrap_err();
        assert_eq!(e.field, "bucket_binding");
        assert!(e.problem.contains("other than the primary"), "{e:?}");
        let e = ReplicaConfig::from_value(&json!({ "bucket_binding": "9-bad" })).unwrap_err();
        assert_eq!(e.field, "bucket_binding");
        let e = ReplicaConfig::from_value(&json!({ "bucket": "X" })).unwrap_err();
        assert_eq!((e.field.as_str(), e.problem.as_str()), ("bucket", "is not a known field"));
        let e = ReplicaConfig::from_value(&json!({})).unwrap_err();
        assert_eq!(e.field, "bucket_binding");
        assert!(e.problem.starts_with("is required (or endpoint"), "{e:?}");
        let e = ReplicaConfig::from_value(&json!("BACKUPS_EU")).unwrap_err();
        assert!(e.problem.starts_with("must be a table"), "{e:?}");
    }

    #[test]
    fn a_replica_table_with_an_endpoint_is_an_s3_bucket_named_by_its_label() {
        let table = json!({
            "endpoint": "https://s3.eu-central-1.amazonaws.com",
            "region": "eu-central-1",
            "bucket": "ferry-copy",
            "credentials_secret": "REPLICA_S3_KEYS",
        });
        let c = ReplicaConfig::from_value(&table).unwrap();
        assert!(matches!(&c, ReplicaConfig::S3(s) if s.bucket == "ferry-copy"), "{c:?}");
        assert_eq!(c.bucket_binding(), None, "no R2 binding");
        assert_eq!(c.secret_name(), Some("REPLICA_S3_KEYS"));
        assert!(c.name().starts_with(crate::s3::LABEL_SCHEME) && c.name().contains("ferry-copy"), "{}", c.name());
        // The snapshot a job keeps reads back as the same replica.
        let back: ReplicaConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let r2 = ReplicaConfig::from_value(&json!({ "bucket_binding": "BACKUPS_EU" })).unwrap();
        let back: ReplicaConfig = serde_json::from_value(serde_json::to_value(&r2).unwrap()).unwrap();
        assert_eq!(back, r2);
        // Errors name the field inside the table.
        let mut missing = table.clone();
        missing.as_object_mut().unwrap().remove("region");
        assert_eq!(ReplicaConfig::from_value(&missing).unwrap_err().field, "region");
        let mut both = table.clone();
        both["bucket_binding"] = json!("BACKUPS_EU");
        assert_eq!(ReplicaConfig::from_value(&both).unwrap_err().field, "endpoint", "one kind of replica at a time");
        // The same-bucket reason says what to change for each kind.
        let reason = same_bucket_reason(&c.name());
        assert!(reason.contains("replica.endpoint") && reason.contains("primary bucket BACKUPS"), "{reason}");
    }

    #[test]
    fn a_probe_read_back_through_the_primary_means_one_bucket() {
        let probe = ReplicaProbe { key: format!("{PROBE_PREFIX}j-1"), token: "t-1".into() };
        assert_eq!(judge_probe(&probe, Some(b"t-1")), ProbeAnswer::SameBucket);
        assert_eq!(judge_probe(&probe, None), ProbeAnswer::Distinct);
        assert_eq!(judge_probe(&probe, Some(b"t-0")), ProbeAnswer::Distinct, "only the probe's own token counts");
        assert!(crate::manifest::parse_folder(PROBE_PREFIX).is_none(), "never a source's folder");
        let reason = same_bucket_reason("BACKUPS_EU");
        assert!(reason.contains("BACKUPS_EU") && reason.contains("primary bucket BACKUPS"), "{reason}");
    }
}
