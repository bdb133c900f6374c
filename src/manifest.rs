//! The R2 layout and the manifest that commits a backup.
//!
//! Every job writes into its own folder, `{source}/{started_at:YYYY-MM-DDTHHMMSSZ}-{job_id}/`: the
//! provider's files first, then `manifest.json`, written last as the commit marker. A folder
//! without a manifest is not a backup and is never listed or served as one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::{JobId, Trigger};
use crate::time::Timestamp;

/// Name of the commit marker in each backup folder.
pub const MANIFEST_NAME: &str = "manifest.json";

/// One file of a backup as it landed in R2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Full R2 key.
    pub key: String,
    /// The provider's file name.
    pub filename: String,
    /// Bytes stored.
    pub size: u64,
    /// Lower-case hex SHA-256 of the bytes stored.
    pub sha256: String,
    /// Content type stored with the object.
    pub content_type: String,
    /// Multipart parts used (1 for a single put).
    #[serde(default = "one")]
    pub parts: u32,
    /// Lower-case hex SHA-256 of each multipart part, in order (empty for a single put).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub part_sha256: Vec<String>,
    /// Provider-specific facts about the file (e.g. node and relationship counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// SQL dumps only: the lower-case hex MD5 of the bytes stored (D1's import `etag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    /// SQL dumps only: rows per table, counted from the dump's `INSERT` statements while it was
    /// copied (what a restore drill compares with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_counts: Option<std::collections::BTreeMap<String, u64>>,
}

#[cfg(test)]
impl Artifact {
    /// A stored file as tests describe one: a single part, and no per-part hashes, details, MD5
    /// or row counts (set them with struct update syntax).
    pub fn sample(
        key: impl Into<String>,
        filename: impl Into<String>,
        size: u64,
        sha256: impl Into<String>,
        content_type: &str,
    ) -> Self {
        Self {
            key: key.into(),
            filename: filename.into(),
            size,
            sha256: sha256.into(),
            content_type: content_type.into(),
            parts: 1,
            part_sha256: Vec::new(),
            details: None,
            md5: None,
            row_counts: None,
        }
    }
}

fn one() -> u32 {
    1
}

/// The commit record of one backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Source name.
    pub source: String,
    /// Provider kind (`d1`, …).
    pub kind: String,
    /// The job that made it.
    pub job_id: JobId,
    /// What started the job.
    pub trigger: Trigger,
    /// When the job started (also in the folder name).
    pub started_at: Timestamp,
    /// The cron fire time the job served, for a scheduled backup: retention counts the backup at
    /// this time (`crate::retention::backup_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<Timestamp>,
    /// When the last artifact was stored.
    pub finished_at: Timestamp,
    /// The provider's references: ids, bookmarks, filenames.
    pub provider: Value,
    /// Every file of the backup.
    pub artifacts: Vec<Artifact>,
}

/// `{source}/{stamp}-{job_id}/`
pub fn folder(source: &str, started_at: Timestamp, job_id: &JobId) -> String {
    format!("{source}/{}-{}/", started_at.folder_stamp(), job_id)
}

/// The key of the manifest in `folder`.
pub fn manifest_key(folder: &str) -> String {
    format!("{folder}{MANIFEST_NAME}")
}

/// True for keys of the form `{source}/{folder}/manifest.json`.
pub fn is_manifest_key(key: &str) -> bool {
    key.split('/').count() == 3 && key.ends_with(&format!("/{MANIFEST_NAME}"))
}

/// The folder (with trailing slash) an artifact key lives in: `{source}/{folder}/`.
pub fn folder_of(key: &str) -> Option<&str> {
    let mut slashes = key.match_indices('/');
    let _ = slashes.next()?;
    let (i, _) = slashes.next()?;
    let rest = &key[i + 1..];
    (!rest.is_empty()).then(|| &key[..=i])
}

/// The source and job id of a Ferry folder, `{source}/{YYYY-MM-DDTHHMMSSZ}-{job_id}/`; `None` for
/// any other prefix (something Ferry did not write, or a reserved prefix such as `_ferry/`).
pub fn parse_folder(folder: &str) -> Option<(&str, &str)> {
    let inner = folder.strip_suffix('/')?;
    let (source, name) = inner.split_once('/')?;
    let (stamp, job_id) = name.split_at_checked(18)?;
    let job_id = job_id.strip_prefix('-')?;
    let stamp_ok = stamp.bytes().enumerate().all(|(i, b)| match i {
        4 | 7 => b == b'-',
        10 => b == b'T',
        17 => b == b'Z',
        _ => b.is_ascii_digit(),
    });
    let valid_source = source.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    (stamp_ok && valid_source && JobId::parse(job_id).is_some()).then_some((source, job_id))
}

/// The names of Ferry's own records in a backup folder: the manifest (the commit marker), the
/// pin (`crate::retention::PIN_NAME`), the last verification (`crate::verify::VERIFICATION_NAME`)
/// and the last drill (`crate::restore::DRILL_NAME`). No provider file is ever stored under one
/// of them ([`object_name`]).
pub const RECORD_NAMES: [&str; 4] = [MANIFEST_NAME, "pin.json", "verification.json", "drill.json"];

/// The marker that sets a provider's file apart from Ferry's records: a file whose (safe) name is
/// a record name, or already starts with the marker, is stored with the marker in front.
pub const RESERVED_MARKER: &str = "artifact-";

/// The stored name of a (safe) provider file name: itself, unless it is one of
/// [`RECORD_NAMES`] or starts with [`RESERVED_MARKER`], when the marker is put in front.
/// Injective, and its image never meets a record name (no record name starts with the marker),
/// so a provider file can neither pin a backup nor be overwritten by a verification or a drill.
pub fn reserve(name: &str) -> String {
    if RECORD_NAMES.contains(&name) || name.starts_with(RESERVED_MARKER) {
        format!("{RESERVED_MARKER}{name}")
    } else {
        name.to_string()
    }
}

/// A safe object name for a provider's file name: its last path segment, with anything but
/// `A-Z a-z 0-9 . _ -` replaced, never hidden, never one of Ferry's [`RECORD_NAMES`] (see
/// [`reserve`]), never clashing with `taken` (the names already stored in the folder). The
/// manifest keeps the provider's own name next to the key (`Artifact::filename`), which restores
/// and downloads use.
pub fn object_name(filename: &str, taken: &[&str]) -> String {
    let last = filename.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String =
        last.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        name = "artifact".into();
    }
    if name.len() > 200 {
        name.truncate(200);
    }
    let mut stored = reserve(&name);
    let mut n = 2;
    while taken.contains(&stored.as_str()) {
        stored = reserve(&format!("{n}-{name}"));
        n += 1;
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_and_keys_follow_the_layout() {
        let t = Timestamp::parse_rfc3339("2026-11-23T10:15:00.250Z").unwrap();
        let f = folder("app-db", t, &JobId::new("0123456789abcdef"));
        assert_eq!(f, "app-db/2026-11-23T101500Z-0123456789abcdef/");
        assert_eq!(manifest_key(&f), "app-db/2026-11-23T101500Z-0123456789abcdef/manifest.json");
        assert!(is_manifest_key(&manifest_key(&f)));
        assert!(!is_manifest_key("app-db/x/y/manifest.json"));
        assert!(!is_manifest_key("app-db/x/dump.sql"));
    }

    #[test]
    fn folder_of_takes_the_first_two_segments() {
        assert_eq!(folder_of("a/f/dump.sql"), Some("a/f/"));
        assert_eq!(folder_of("a/f/"), None);
        assert_eq!(folder_of("a/dump.sql"), None);
        assert_eq!(folder_of("a/f/sub/x"), Some("a/f/"));
    }

    #[test]
    fn parse_folder_accepts_only_the_layout() {
        assert_eq!(parse_folder("app-db/2026-11-23T101500Z-0123456789abcdef/"), Some(("app-db", "0123456789abcdef")));
        for other in [
            "app-db/2026-11-23T101500Z-0123456789abcdef",
            "app-db/2026-11-23T101500Z-0123456789ABCDEF/",
            "app-db/2026-11-23T101500Z-0123/",
            "app-db/2026-11-23 101500Z-0123456789abcdef/",
            "_ferry/2026-11-23T101500Z-0123456789abcdef/",
            "app-db/notes/",
            "app-db/",
            "",
            "a/b/c/",
        ] {
            assert_eq!(parse_folder(other), None, "{other}");
        }
    }

    #[test]
    fn object_names_are_safe_and_unique() {
        assert_eq!(object_name("db-bm.sql", &[]), "db-bm.sql");
        assert_eq!(object_name("../../etc/passwd", &[]), "passwd");
        assert_eq!(object_name("a b?.sql", &[]), "a_b_.sql");
        assert_eq!(object_name(".hidden", &[]), "hidden");
        assert_eq!(object_name("", &[]), "artifact");
        assert_eq!(object_name("manifest.json", &[]), "artifact-manifest.json");
        assert_eq!(object_name("x/manifest.json", &["artifact-manifest.json"]), "2-manifest.json");
        assert_eq!(object_name("x.gz", &["x.gz"]), "2-x.gz");
        assert_eq!(object_name("x.gz", &["x.gz", "2-x.gz"]), "3-x.gz");
    }

    #[test]
    fn no_provider_file_is_stored_under_a_record_name() {
        for record in RECORD_NAMES {
            assert_eq!(object_name(record, &[]), format!("artifact-{record}"));
            assert_eq!(object_name(&format!("dir/{record}"), &[]), format!("artifact-{record}"));
        }
        // A provider name that already looks escaped is escaped again, so the two stay apart.
        assert_eq!(object_name("artifact-pin.json", &[]), "artifact-artifact-pin.json");
        assert_eq!(object_name("artifact-x.gz", &[]), "artifact-artifact-x.gz");
        assert_eq!(object_name("artifact", &[]), "artifact");
    }

    #[test]
    fn every_record_name_the_crate_writes_is_reserved() {
        for written in
            [MANIFEST_NAME, crate::retention::PIN_NAME, crate::verify::VERIFICATION_NAME, crate::restore::DRILL_NAME]
        {
            assert!(RECORD_NAMES.contains(&written), "{written}");
        }
        assert!(RECORD_NAMES.iter().all(|r| !r.starts_with(RESERVED_MARKER)));
    }

    proptest::proptest! {
        #[test]
        fn reserve_is_injective_and_never_a_record_name(
            a in "(artifact-){0,2}(pin|manifest|drill|verification|x)?[.a-z_-]{0,6}(\\.json)?",
            b in "(artifact-){0,2}(pin|manifest|drill|verification|x)?[.a-z_-]{0,6}(\\.json)?",
        ) {
            let (ra, rb) = (reserve(&a), reserve(&b));
            proptest::prop_assert!(!RECORD_NAMES.contains(&ra.as_str()), "{} -> {}", a, ra);
            proptest::prop_assert_eq!(a == b, ra == rb, "{} -> {}, {} -> {}", a, ra, b, rb);
        }

        #[test]
        fn a_folders_stored_names_are_distinct_and_never_record_names(
            names in proptest::collection::vec(
                "(artifact-|[0-9]-|dir/|\\.)?(pin|manifest|drill|verification|g01|a b)?[.?_-]{0,2}(\\.json|\\.gz)?",
                0..12,
            ),
        ) {
            let mut stored: Vec<String> = Vec::new();
            for name in &names {
                let taken: Vec<&str> = stored.iter().map(String::as_str).collect();
                let next = object_name(name, &taken);
                proptest::prop_assert!(!RECORD_NAMES.contains(&next.as_str()), "{} -> {}", name, next);
                proptest::prop_assert!(!taken.contains(&next.as_str()), "{} -> {} clashes", name, next);
                proptest::prop_assert!(!next.contains('/') && !next.starts_with('.'), "{}", next);
                stored.push(next);
            }
        }
    }

    #[test]
    fn manifest_serializes_with_the_documented_fields() {
        let m = Manifest {
            source: "app-db".into(),
            kind: "d1".into(),
            job_id: JobId::new("0123456789abcdef"),
            trigger: Trigger::Webhook,
            started_at: Timestamp::from_secs(1_795_429_500),
            scheduled_for: None,
            finished_at: Timestamp::from_secs(1_795_429_510),
            provider: serde_json::json!({"at_bookmark": "b"}),
            artifacts: vec![Artifact::sample("app-db/f/x.sql", "x.sql", 3, "ab", "application/sql")],
        };
        let v = serde_json::to_value(&m).unwrap();
        for field in ["source", "kind", "job_id", "trigger", "started_at", "finished_at", "provider", "artifacts"] {
            assert!(v.get(field).is_some(), "{field}");
        }
        assert_eq!(v["trigger"], "webhook");
        assert_eq!(v["started_at"], "2026-11-23T10:25:00.000Z");
        for field in ["key", "filename", "size", "sha256", "content_type"] {
            assert!(v["artifacts"][0].get(field).is_some(), "{field}");
        }
        assert_eq!(serde_json::from_value::<Manifest>(v).unwrap(), m);
    }
}
