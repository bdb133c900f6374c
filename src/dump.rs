//! Facts about a D1 SQL dump gathered while it is copied: its MD5 (D1's import wants it as the
//! `etag`) and its rows per table, counted from its `INSERT INTO "t" (…) VALUES(…);` statements
//! (what a restore drill compares a restored database with).
//!
//! The counter reads the dump a chunk at a time, in any chunking, and keeps only a small state
//! between chunks (the head of the statement it is in, whether it is inside a quoted string, the
//! counts so far), so a copy cut off between slices resumes it from the persisted state. Quotes are
//! parsed properly: a `;` or a newline inside a string literal or a quoted identifier does not end
//! a statement, and a doubled quote (`''`, `""`) is two quotes, which leaves the state as it was.
//! The dump format is `provider-apis.md` §1.4.

use std::collections::BTreeMap;

use md5::digest::common::hazmat::{SerializableState, SerializedState};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// The bytes every counted statement starts with.
const INSERT_HEAD: &[u8] = b"INSERT INTO \"";
/// The longest statement head kept while looking for the table's name; a longer name is not
/// counted (SQLite names that long do not occur in practice).
const MAX_HEAD: usize = 1024;

/// Rows per table, counted from a dump's `INSERT` statements as its bytes stream past.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCounter {
    /// The head of the current statement while it may still be a counted `INSERT` whose table
    /// name is not complete yet; `None` once the statement is decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<Vec<u8>>,
    /// The table the current statement inserts into, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    /// The quote character of the string or identifier the counter is inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quote: Option<u8>,
    /// Whether the current statement has begun (whitespace between statements is skipped).
    #[serde(default)]
    started: bool,
    /// Statements ended so far, per table.
    counts: BTreeMap<String, u64>,
}

impl RowCounter {
    /// Reads the next bytes of the dump.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if !self.started {
            if b.is_ascii_whitespace() {
                return;
            }
            self.started = true;
            self.head = Some(Vec::new());
            self.table = None;
        }
        if let Some(head) = self.head.as_mut() {
            head.push(b);
            match decide(head) {
                Head::Undecided => {}
                Head::Table(name) => {
                    self.table = Some(name);
                    self.head = None;
                }
                Head::Other => self.head = None,
            }
        }
        match self.quote {
            Some(q) if b == q => self.quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => self.quote = Some(b),
            None if b == b';' => {
                if let Some(table) = self.table.take() {
                    *self.counts.entry(table).or_default() += 1;
                }
                self.head = None;
                self.started = false;
            }
            None => {}
        }
    }

    /// The rows counted per table, in statements that ended.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }
}

enum Head {
    Undecided,
    Table(String),
    Other,
}

/// What a statement's head says: not an `INSERT INTO "…"`, the table it inserts into, or not yet
/// known. The name ends at a `"` followed by anything but another `"`.
fn decide(head: &[u8]) -> Head {
    let n = head.len().min(INSERT_HEAD.len());
    if head[..n] != INSERT_HEAD[..n] {
        return Head::Other;
    }
    if head.len() > MAX_HEAD {
        return Head::Other;
    }
    let rest = &head[n..];
    let mut name = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'"' {
            match rest.get(i + 1) {
                None => return Head::Undecided,
                Some(b'"') => {
                    name.push(b'"');
                    i += 2;
                    continue;
                }
                Some(_) => return Head::Table(String::from_utf8_lossy(&name).into_owned()),
            }
        }
        name.push(rest[i]);
        i += 1;
    }
    Head::Undecided
}

/// The MD5 and the row counts of a dump being copied, as persisted with the copy's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TallyState {
    /// Hex of the serialized MD5 state over the bytes so far.
    pub md5_state: String,
    /// The row counter so far.
    pub rows: RowCounter,
}

impl TallyState {
    /// The state before the first byte.
    pub fn fresh() -> Self {
        Tally::default().save()
    }
}

/// The live MD5 and row counter of a dump being copied.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    md5: Md5,
    rows: RowCounter,
}

impl Tally {
    /// Whether a file is a SQL dump whose facts are gathered (by its name).
    pub fn applies_to(filename: &str) -> bool {
        filename.to_ascii_lowercase().ends_with(".sql")
    }

    /// Reads the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.md5.update(bytes);
        self.rows.update(bytes);
    }

    /// The state to persist.
    pub fn save(&self) -> TallyState {
        TallyState { md5_state: hex::encode(self.md5.serialize().as_slice()), rows: self.rows.clone() }
    }

    /// Restores a tally from [`Tally::save`]'s output; `None` when the saved state is corrupt.
    pub fn load(state: &TallyState) -> Option<Self> {
        let bytes = hex::decode(&state.md5_state).ok()?;
        let array = SerializedState::<Md5>::try_from(bytes.as_slice()).ok()?;
        let md5 = Md5::deserialize(&array).ok()?;
        Some(Self { md5, rows: state.rows.clone() })
    }

    /// The lower-case hex MD5 of every byte read, and the rows counted per table.
    pub fn finish(&self) -> (String, BTreeMap<String, u64>) {
        (hex::encode(self.md5.clone().finalize()), self.rows.counts.clone())
    }
}

/// Bytes one step of a drill's MD5 read-back reads at most (a step also stops early when the
/// invocation nears its CPU limit): the MD5 of a whole dump advances in bounded, persisted steps.
pub const DIGEST_STEP_BYTES: u64 = 256 * 1024 * 1024;

/// How far a stepped MD5 of an R2 object has read, persisted between steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Md5Progress {
    /// Bytes read so far.
    pub offset: u64,
    /// Hex of the serialized MD5 state over them.
    pub md5_state: String,
}

impl Md5Progress {
    /// Before the first byte.
    pub fn start() -> Self {
        Self::after(&Md5::default(), 0)
    }

    /// The progress after `offset` bytes hashed into `md5`.
    pub fn after(md5: &Md5, offset: u64) -> Self {
        Self { offset, md5_state: hex::encode(md5.serialize().as_slice()) }
    }

    /// The MD5 state to go on from; `None` when the saved state is corrupt.
    pub fn resume(&self) -> Option<Md5> {
        let bytes = hex::decode(&self.md5_state).ok()?;
        let array = SerializedState::<Md5>::try_from(bytes.as_slice()).ok()?;
        Md5::deserialize(&array).ok()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DUMP: &str = "PRAGMA defer_foreign_keys=TRUE;\n\
        CREATE TABLE foo(id INTEGER PRIMARY KEY, value TEXT);\n\
        INSERT INTO \"foo\" (\"id\",\"value\") VALUES(1,'x;y');\n\
        INSERT INTO \"foo\" (\"id\",\"value\") VALUES(2,replace('a\\nb;','\\n',char(10)));\n\
        INSERT INTO \"foo\" (\"id\",\"value\") VALUES(3,'it''s; \"quoted\"\nINSERT INTO \"bar\" VALUES(1);');\n\
        CREATE TABLE \"we\"\"ird\"(v);\n\
        INSERT INTO \"we\"\"ird\" (\"v\") VALUES(X'3b');\n\
        INSERT INTO \"bar;baz\" (\"v\") VALUES(NULL);\n\
        CREATE INDEX i ON foo(value);";

    fn counts(chunks: &[&[u8]]) -> BTreeMap<String, u64> {
        let mut c = RowCounter::default();
        for chunk in chunks {
            c.update(chunk);
        }
        c.counts().clone()
    }

    fn expected() -> BTreeMap<String, u64> {
        BTreeMap::from([("foo".to_string(), 3), ("we\"ird".to_string(), 1), ("bar;baz".to_string(), 1)])
    }

    #[test]
    fn inserts_are_counted_per_table_ignoring_semicolons_and_newlines_in_quotes() {
        assert_eq!(counts(&[DUMP.as_bytes()]), expected());
    }

    #[test]
    fn an_unfinished_insert_is_not_counted_until_its_semicolon() {
        let text = "INSERT INTO \"t\" (\"a\") VALUES(1);\nINSERT INTO \"t\" (\"a\") VALUES('x;";
        assert_eq!(counts(&[text.as_bytes()]), BTreeMap::from([("t".to_string(), 1)]));
    }

    #[test]
    fn statements_that_are_not_inserts_count_nothing() {
        let text = "PRAGMA x;\nCREATE TABLE \"t\"(a);\ninsert into \"t\" values(1);\nDELETE FROM sqlite_sequence;";
        assert!(counts(&[text.as_bytes()]).is_empty());
    }

    #[test]
    fn a_persisted_tally_resumes_with_the_same_md5_and_counts() {
        let bytes = DUMP.as_bytes();
        let mut whole = Tally::default();
        whole.update(bytes);
        let mut first = Tally::default();
        first.update(&bytes[..100]);
        let text = serde_json::to_string(&first.save()).unwrap();
        let mut resumed = Tally::load(&serde_json::from_str(&text).unwrap()).unwrap();
        resumed.update(&bytes[100..]);
        assert_eq!(resumed.finish(), whole.finish());
        let (md5, rows) = whole.finish();
        assert_eq!(md5, hex::encode(Md5::digest(bytes)));
        assert_eq!(rows, expected());
    }

    #[test]
    fn a_corrupt_saved_tally_is_refused() {
        let state = TallyState { md5_state: "zz".into(), rows: RowCounter::default() };
        assert!(Tally::load(&state).is_none());
        let state = TallyState { md5_state: "00".into(), rows: RowCounter::default() };
        assert!(Tally::load(&state).is_none());
    }

    #[test]
    fn only_sql_files_are_tallied() {
        assert!(Tally::applies_to("db.SQL"));
        assert!(!Tally::applies_to("db.sql.gz"));
    }

    proptest! {
        #[test]
        fn any_split_through_a_saved_state_gives_the_same_counts(cuts in proptest::collection::vec(0usize..=DUMP.len(), 0..6)) {
            let bytes = DUMP.as_bytes();
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut state = TallyState::fresh();
            let mut at = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                let mut t = Tally::load(&state).unwrap();
                t.update(&bytes[at..cut]);
                state = serde_json::from_str(&serde_json::to_string(&t.save()).unwrap()).unwrap();
                at = cut;
            }
            let (md5, rows) = Tally::load(&state).unwrap().finish();
            prop_assert_eq!(md5, hex::encode(Md5::digest(bytes)));
            prop_assert_eq!(rows, expected());
        }

        #[test]
        fn arbitrary_bytes_in_arbitrary_chunks_never_panic_and_split_the_same(data in proptest::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let cut = cut.min(data.len());
            let whole = counts(&[&data]);
            prop_assert_eq!(counts(&[&data[..cut], &data[cut..]]), whole);
        }

        #[test]
        fn generated_inserts_are_counted_exactly(rows in proptest::collection::vec(("[a-c]{1,3}", "[ -~\n;'\"]{0,20}"), 0..20), cut in 0usize..2000) {
            let mut text = String::from("PRAGMA defer_foreign_keys=TRUE;");
            let mut want: BTreeMap<String, u64> = BTreeMap::new();
            for (table, value) in &rows {
                let v = value.replace('\'', "''");
                text.push_str(&format!("\nINSERT INTO \"{table}\" (\"v\") VALUES('{v}');"));
                *want.entry(table.clone()).or_default() += 1;
            }
            let bytes = text.as_bytes();
            let cut = cut.min(bytes.len());
            prop_assert_eq!(counts(&[&bytes[..cut], &bytes[cut..]]), want);
        }
    }

    #[test]
    fn an_md5_read_in_steps_equals_the_md5_read_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = hex::encode(Md5::digest(&data));
        let mut progress = Md5Progress::start();
        for chunk in data.chunks(777) {
            let mut md5 = progress.resume().expect("state");
            md5.update(chunk);
            progress = Md5Progress::after(&md5, progress.offset + chunk.len() as u64);
        }
        assert_eq!(progress.offset, data.len() as u64);
        assert_eq!(hex::encode(progress.resume().expect("state").finalize()), whole);
        assert!(Md5Progress { offset: 0, md5_state: "zz".into() }.resume().is_none());
    }
}
