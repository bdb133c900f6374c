//! Turns a SQL dump that D1 exported into one that D1's import accepts: a pure, streaming
//! statement rewriter.
//!
//! D1's own dumps (`provider-apis.md` §1.4; miniflare's `workers/d1/dumpSql.ts`, which counts
//! `inserts_over_100kb_with_column_names`) do not always import back into D1:
//! - **One statement is at most 100,000 bytes** (D1 limits; workerd#3049), while a row may hold up
//!   to 2,000,000 bytes, so a row with a long TEXT or BLOB fails with "statement too long"
//!   (workers-sdk#4510, #6146). An `INSERT` over the cap is split: each long value is built up in
//!   a helper table [`PIECES`] (`INSERT` its first piece, then `UPDATE … SET v = v || <piece>`
//!   for the rest, each statement under the cap), and the row is inserted with
//!   `(SELECT v FROM PIECES WHERE n = <column>)` in that value's place. This needs no rowid or key
//!   of the row, so it works the same for `WITHOUT ROWID` tables. `||` on BLOBs gives TEXT with
//!   the same bytes, so a BLOB is read back with `CAST(v AS BLOB)`; a TEXT written with D1's
//!   `replace(…,'\n',char(10))` wrapper gets the wrapper around the assembled text, so a
//!   placeholder cut between two pieces is still replaced. Types are as in the dump: the value
//!   reaches its column exactly as the literal would have.
//! - **Objects that refer to ones created later fail** with "no such table" (workers-sdk#5683,
//!   workerd#2471): the dump writes each table's rows right after its `CREATE TABLE`, in
//!   `sqlite_schema` order, so a child's rows come before its parent table exists, and D1 (foreign
//!   keys on) refuses them even deferred; and it writes indexes, triggers and views
//!   `ORDER BY type`, so an `INSTEAD OF` trigger comes before its view. So the input is read
//!   twice: the first pass writes only the `CREATE TABLE`s, the second everything else. Indexes,
//!   views and triggers are held back until
//!   every table (and every extra artifact appended after the dump) is in: then indexes, views in
//!   an order where a view follows the views it names, and triggers last. Held back means kept in
//!   the persisted state, at most [`MAX_DEFERRED`] bytes.
//! - **Foreign keys stay deferred**: the output starts with `PRAGMA defer_foreign_keys=TRUE;`.
//! - **Replace** (a restore with `"replace": true`): each object of the dump is dropped just before
//!   it is created (`DROP TABLE IF EXISTS` …), inside the same import, so D1's all-or-nothing
//!   import either replaces them or leaves the database as it was.
//!
//! The rewriter reads statements one at a time ([`statement_end`] finds where one ends, quotes,
//! comments and trigger bodies included), so a dump of any size streams through it in bounded
//! steps; between steps only [`RewriteState`] is kept. [`Staging`] is the step itself: where the
//! input stands, the MD5 of everything written so far, and the staged chunks' sizes.

use std::collections::BTreeSet;

use md5::digest::common::hazmat::{SerializableState, SerializedState};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// The helper table long values are assembled in (dropped at the end of the import).
pub const PIECES: &str = "_ferry_restore_pieces";
/// D1's cap on one SQL statement, in bytes (D1 limits: "Maximum SQL statement length").
pub const D1_MAX_STATEMENT: usize = 100_000;
/// The longest statement the rewriter writes: D1's cap, less a margin for how D1 counts.
pub const MAX_STATEMENT: usize = D1_MAX_STATEMENT - 1_000;
/// The most bytes of indexes, views and triggers held back until the end.
pub const MAX_DEFERRED: usize = 512 * 1024;
/// The longest input statement read (a 2 MB row, hex-encoded, with room to spare).
pub const MAX_INPUT_STATEMENT: usize = 6 * 1024 * 1024;

/// Why a dump cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// An `INSERT` over the cap whose values cannot be split.
    #[error(
        "an INSERT into table {table:?} is {bytes} bytes and holds no value that can be split under D1's \
         {D1_MAX_STATEMENT}-byte statement limit"
    )]
    Unsplittable {
        /// The table.
        table: String,
        /// The statement's length.
        bytes: usize,
    },
    /// A statement over the cap that is not an `INSERT`.
    #[error("a statement of {bytes} bytes (\"{head}…\") is over D1's {D1_MAX_STATEMENT}-byte statement limit")]
    TooLong {
        /// Its start.
        head: String,
        /// Its length.
        bytes: usize,
    },
    /// The dump uses the helper table's name.
    #[error("the dump has a table named {PIECES:?}, the name Ferry's restore uses for its helper table")]
    ReservedName,
    /// Too many indexes, views and triggers to hold back.
    #[error("the dump's indexes, views and triggers exceed {MAX_DEFERRED} bytes, more than a restore holds back")]
    SchemaTooLarge,
    /// No statement end within the bytes a step may read.
    #[error("no statement ends within {MAX_INPUT_STATEMENT} bytes at offset {offset} of {key}")]
    Unterminated {
        /// The object.
        key: String,
        /// Where the statement starts.
        offset: u64,
    },
    /// The staging state did not load.
    #[error("the staged import's saved MD5 state is corrupt")]
    CorruptState,
}

/// What kind of schema object a held-back statement creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Object {
    /// `CREATE [UNIQUE] INDEX`.
    Index,
    /// `CREATE VIEW`.
    View,
    /// `CREATE TRIGGER`.
    Trigger,
}

/// A held-back statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deferred {
    /// What it creates.
    pub object: Object,
    /// The object's name.
    pub name: String,
    /// The statement, with its `;`.
    pub sql: String,
}

/// What the rewriter keeps between statements (and steps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteState {
    /// Drop each object before creating it.
    #[serde(default)]
    pub replace: bool,
    /// The second pass (every statement but `CREATE TABLE`); the first writes only the tables.
    #[serde(default)]
    pub second_pass: bool,
    /// The opening `PRAGMA` was written.
    #[serde(default)]
    pub begun: bool,
    /// The helper table was created.
    #[serde(default)]
    pub pieces_table: bool,
    /// Indexes, views and triggers held back, in dump order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<Deferred>,
    /// `INSERT`s split so far.
    #[serde(default)]
    pub split_rows: u64,
    /// Statements written so far.
    #[serde(default)]
    pub written: u64,
}

/// The end (just past its `;`) of the first complete statement in `data`, if one ends there.
/// Quotes (`'…'`, `"…"`, `` `…` ``, `[…]`), comments and a trigger's `BEGIN … END` body are
/// skipped; `CASE … END` inside a trigger body does not end it.
pub fn statement_end(data: &[u8]) -> Option<usize> {
    let mut scan = Scan::default();
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        match scan.mode {
            Mode::Quote(q) => {
                if b == q {
                    scan.mode = Mode::Code;
                }
            }
            Mode::LineComment => {
                if b == b'\n' {
                    scan.mode = Mode::Code;
                }
            }
            Mode::BlockComment => {
                if b == b'*' && data.get(i + 1) == Some(&b'/') {
                    scan.mode = Mode::Code;
                    i += 1;
                }
            }
            Mode::Code => {
                if is_word_byte(b) {
                    scan.word.push(b.to_ascii_uppercase());
                } else {
                    scan.end_word();
                    match b {
                        b'\'' | b'"' | b'`' => scan.mode = Mode::Quote(b),
                        b'[' => scan.mode = Mode::Quote(b']'),
                        b'-' if data.get(i + 1) == Some(&b'-') => scan.mode = Mode::LineComment,
                        b'/' if data.get(i + 1) == Some(&b'*') => {
                            scan.mode = Mode::BlockComment;
                            i += 1;
                        }
                        b';' if !scan.trigger || scan.body_ended => return Some(i + 1),
                        _ => {}
                    }
                }
            }
        }
        i += 1;
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    #[default]
    Code,
    Quote(u8),
    LineComment,
    BlockComment,
}

#[derive(Debug, Default)]
struct Scan {
    mode: Mode,
    word: Vec<u8>,
    /// The statement's first words (up to three), to recognise `CREATE [TEMP] TRIGGER`.
    lead: Vec<Vec<u8>>,
    trigger: bool,
    case_depth: u32,
    body_ended: bool,
}

impl Scan {
    fn end_word(&mut self) {
        if self.word.is_empty() {
            return;
        }
        let word = std::mem::take(&mut self.word);
        if self.lead.len() < 3 && !self.trigger {
            self.lead.push(word.clone());
            let lead: Vec<&[u8]> = self.lead.iter().map(Vec::as_slice).collect();
            self.trigger =
                matches!(lead.as_slice(), [b"CREATE", b"TRIGGER"] | [b"CREATE", b"TEMP" | b"TEMPORARY", b"TRIGGER"]);
        }
        if self.trigger {
            match word.as_slice() {
                b"CASE" => self.case_depth += 1,
                b"END" if self.case_depth > 0 => self.case_depth -= 1,
                b"END" => self.body_ended = true,
                _ => {}
            }
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// A statement's kind, from its first tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Table(String),
    Deferred(Object, String),
    Insert(String),
    DeferForeignKeys,
    Other,
}

/// The tokens of a statement: words as written, names unquoted, punctuation as itself.
struct Tokens<'a> {
    s: &'a str,
    pos: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Name(String),
    Punct(char),
}

impl<'a> Tokens<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, pos: 0 }
    }

    fn skip_space(&mut self) {
        let bytes = self.s.as_bytes();
        loop {
            while self.pos < bytes.len() && bytes[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if bytes[self.pos..].starts_with(b"--") {
                self.pos = self.s[self.pos..].find('\n').map_or(bytes.len(), |n| self.pos + n + 1);
            } else if bytes[self.pos..].starts_with(b"/*") {
                self.pos = self.s[self.pos + 2..].find("*/").map_or(bytes.len(), |n| self.pos + 2 + n + 2);
            } else {
                return;
            }
        }
    }

    fn next_token(&mut self) -> Option<Token> {
        self.skip_space();
        let bytes = self.s.as_bytes();
        let &b = bytes.get(self.pos)?;
        if is_word_byte(b) {
            let start = self.pos;
            while self.pos < bytes.len() && is_word_byte(bytes[self.pos]) {
                self.pos += 1;
            }
            return Some(Token::Word(self.s[start..self.pos].to_string()));
        }
        let close = match b {
            b'"' | b'\'' | b'`' => b,
            b'[' => b']',
            _ => {
                let c = self.s[self.pos..].chars().next()?;
                self.pos += c.len_utf8();
                return Some(Token::Punct(c));
            }
        };
        let mut name = String::new();
        let mut i = self.pos + 1;
        loop {
            let rel = self.s[i..].find(close as char)?;
            name.push_str(&self.s[i..i + rel]);
            i += rel + 1;
            if close != b']' && bytes.get(i) == Some(&close) {
                name.push(close as char);
                i += 1;
            } else {
                break;
            }
        }
        self.pos = i;
        Some(Token::Name(name))
    }

    /// A (possibly schema-qualified) object name: the last part.
    fn name(&mut self) -> Option<String> {
        let mut name = match self.next_token()? {
            Token::Word(w) => w,
            Token::Name(n) => n,
            Token::Punct(_) => return None,
        };
        let save = self.pos;
        if self.next_token() == Some(Token::Punct('.')) {
            name = match self.next_token()? {
                Token::Word(w) | Token::Name(w) => w,
                Token::Punct(_) => return None,
            };
        } else {
            self.pos = save;
        }
        Some(name)
    }

    /// Skips `IF NOT EXISTS` (or `IF EXISTS`) when it comes next.
    fn skip_if_exists(&mut self) {
        let save = self.pos;
        if word(&self.next_token()).as_deref() == Some("IF") {
            let mut next = word(&self.next_token());
            if next.as_deref() == Some("NOT") {
                next = word(&self.next_token());
            }
            if next.as_deref() == Some("EXISTS") {
                return;
            }
        }
        self.pos = save;
    }
}

/// A word token, upper-cased (for keywords).
fn word(t: &Option<Token>) -> Option<String> {
    match t {
        Some(Token::Word(w)) => Some(w.to_ascii_uppercase()),
        _ => None,
    }
}

fn classify(stmt: &str) -> Kind {
    let mut t = Tokens::new(stmt);
    let first = t.next_token();
    match word(&first).as_deref() {
        Some("CREATE") => {
            let mut next = t.next_token();
            if matches!(word(&next).as_deref(), Some("TEMP" | "TEMPORARY" | "UNIQUE" | "VIRTUAL")) {
                next = t.next_token();
            }
            let object = match word(&next).as_deref() {
                Some("TABLE") => None,
                Some("INDEX") => Some(Object::Index),
                Some("VIEW") => Some(Object::View),
                Some("TRIGGER") => Some(Object::Trigger),
                _ => return Kind::Other,
            };
            t.skip_if_exists();
            let Some(name) = t.name() else { return Kind::Other };
            match object {
                None => Kind::Table(name),
                Some(o) => Kind::Deferred(o, name),
            }
        }
        Some("INSERT") => {
            if word(&t.next_token()).as_deref() != Some("INTO") {
                return Kind::Other;
            }
            match t.name() {
                Some(name) => Kind::Insert(name),
                None => Kind::Other,
            }
        }
        Some("PRAGMA") => {
            let rest: String = stmt[t.pos..].chars().filter(|c| !c.is_whitespace()).collect();
            if rest.to_ascii_lowercase().starts_with("defer_foreign_keys") {
                Kind::DeferForeignKeys
            } else {
                Kind::Other
            }
        }
        _ => Kind::Other,
    }
}

/// `"name"` with embedded quotes doubled.
pub fn quote_name(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One value of an `INSERT`, as far as splitting goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value<'a> {
    /// `'…'`: the escaped text between the quotes, inside `wrap` `replace(` calls ending with
    /// `suffix`.
    Text { inner: &'a str, wraps: usize, suffix: &'a str },
    /// `X'…'`: the hex digits.
    Blob(&'a str),
    /// Anything else, kept as it is.
    Other(&'a str),
}

impl Value<'_> {
    /// Whether a long value of this kind can be split.
    fn splittable(&self) -> bool {
        !matches!(self, Value::Other(_))
    }
}

/// The `INSERT INTO t (…) VALUES(` head and the values of a one-row `INSERT`.
fn parse_insert(stmt: &str) -> Option<(&str, Vec<&str>)> {
    let body = stmt.trim_end().strip_suffix(';')?.trim_end();
    let bytes = body.as_bytes();
    // The column list's `(`, then `VALUES(`.
    let mut t = Tokens::new(body);
    t.next_token(); // INSERT
    t.next_token(); // INTO
    t.name()?;
    t.skip_space();
    if bytes.get(t.pos) == Some(&b'(') {
        let close = matching_paren(body, t.pos)?;
        t.pos = close + 1;
    }
    if word(&t.next_token()).as_deref() != Some("VALUES") {
        return None;
    }
    t.skip_space();
    if bytes.get(t.pos) != Some(&b'(') {
        return None;
    }
    let open = t.pos;
    let close = matching_paren(body, open)?;
    if close + 1 != body.len() {
        return None; // several rows, or something after the row
    }
    let head = &stmt[..open + 1];
    Some((head, top_level_split(&body[open + 1..close])))
}

/// The bytes of `s`, with their positions, that are outside quotes (`'…'`, `"…"`, `` `…` ``,
/// `[…]`; a doubled quote closes and opens again).
fn unquoted(s: &str) -> impl Iterator<Item = (usize, u8)> + '_ {
    let mut quote: Option<u8> = None;
    s.bytes().enumerate().filter(move |&(_, b)| match quote {
        Some(q) => {
            if b == q {
                quote = None;
            }
            false
        }
        None => {
            quote = match b {
                b'\'' | b'"' | b'`' => Some(b),
                b'[' => Some(b']'),
                _ => return true,
            };
            false
        }
    })
}

/// The `)` matching the `(` at `open`, outside quotes.
fn matching_paren(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in unquoted(s).skip_while(|&(i, _)| i < open) {
        match b {
            b'(' => depth += 1,
            b')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `s` split at commas outside quotes and parentheses.
fn top_level_split(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, b) in unquoted(s) {
        match b {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The escaped text of a `'…'` literal that is the whole of `s`.
fn text_literal(s: &str) -> Option<&str> {
    let inner = s.strip_prefix('\'')?.strip_suffix('\'')?;
    // Every quote inside is doubled.
    let mut quotes = 0usize;
    for b in inner.bytes() {
        if b == b'\'' {
            quotes += 1;
        } else if quotes % 2 == 1 {
            return None;
        }
    }
    quotes.is_multiple_of(2).then_some(inner)
}

fn parse_value(raw: &str) -> Value<'_> {
    let s = raw.trim();
    if let Some(inner) = text_literal(s) {
        return Value::Text { inner, wraps: 0, suffix: "" };
    }
    if let Some(hex) = s.strip_prefix("X'").or_else(|| s.strip_prefix("x'")).and_then(|h| h.strip_suffix('\'')) {
        if hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Value::Blob(hex);
        }
        return Value::Other(s);
    }
    // D1's `replace(replace('…','\r',char(13)),'\n',char(10))`.
    let mut rest = s;
    let mut wraps = 0;
    while let Some(r) = rest.strip_prefix("replace(") {
        rest = r;
        wraps += 1;
    }
    if wraps == 0 || !rest.starts_with('\'') {
        return Value::Other(s);
    }
    // The literal ends at the first quote not doubled.
    let bytes = rest.as_bytes();
    let mut i = 1;
    let end = loop {
        match bytes.get(i) {
            None => return Value::Other(s),
            Some(b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 2,
            Some(b'\'') => break i,
            Some(_) => i += 1,
        }
    };
    let inner = &rest[1..end];
    let suffix = &rest[end + 1..];
    if wrapper_suffix(suffix) == Some(wraps) {
        Value::Text { inner, wraps, suffix }
    } else {
        Value::Other(s)
    }
}

/// How many `,'<placeholder>',char(N))` make up `s` exactly.
fn wrapper_suffix(mut s: &str) -> Option<usize> {
    let mut n = 0;
    while !s.is_empty() {
        let r = s.strip_prefix(",'")?;
        let close = r.find('\'')?;
        let r = r[close + 1..].strip_prefix(",char(")?;
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        s = r[digits..].strip_prefix("))")?;
        n += 1;
    }
    Some(n)
}

impl Value<'_> {
    /// The literal pieces (each a complete SQL literal) of at most about `max` bytes.
    fn pieces(&self, max: usize) -> Vec<String> {
        let max = max.max(8);
        match self {
            Value::Blob(hex) => {
                let step = (max - 3) & !1;
                hex.as_bytes().chunks(step).map(|c| format!("X'{}'", String::from_utf8_lossy(c))).collect()
            }
            Value::Text { inner, .. } => {
                let mut out = Vec::new();
                let bytes = inner.as_bytes();
                let mut start = 0;
                while start < bytes.len() {
                    let mut end = (start + max - 2).min(bytes.len());
                    // Never between the two quotes of `''`, never inside a UTF-8 character.
                    while end < bytes.len() && !inner.is_char_boundary(end) {
                        end -= 1;
                    }
                    let quotes_before = bytes[start..end].iter().rev().take_while(|b| **b == b'\'').count();
                    if quotes_before % 2 == 1 {
                        end -= 1;
                    }
                    if end <= start {
                        // A run of characters that cannot be cut (cannot happen with max ≥ 8).
                        end = bytes.len();
                    }
                    out.push(format!("'{}'", &inner[start..end]));
                    start = end;
                }
                out
            }
            Value::Other(s) => vec![s.to_string()],
        }
    }

    /// The expression that reads the assembled value back from the helper table.
    fn read_back(&self, n: usize) -> String {
        let v = match self {
            Value::Blob(_) => "CAST(v AS BLOB)".to_string(),
            Value::Text { wraps, suffix, .. } => format!("{}v{suffix}", "replace(".repeat(*wraps)),
            Value::Other(s) => return s.to_string(),
        };
        format!("(SELECT {v} FROM {} WHERE n = {n})", quote_name(PIECES))
    }
}

impl RewriteState {
    /// A fresh rewriter; `replace` drops each object of the dump before creating it.
    pub fn new(replace: bool) -> Self {
        Self { replace, ..Self::default() }
    }

    fn emit(&mut self, out: &mut Vec<u8>, sql: &str) {
        out.extend_from_slice(sql.as_bytes());
        out.push(b'\n');
        self.written += 1;
    }

    /// Rewrites one statement of the dump (with its `;`) into `out`, one statement a line.
    pub fn statement(&mut self, stmt: &str, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let stmt = stmt.trim();
        if stmt.is_empty() || stmt == ";" {
            return Ok(());
        }
        if !self.begun {
            self.begun = true;
            self.emit(out, "PRAGMA defer_foreign_keys=TRUE;");
        }
        let kind = classify(stmt);
        // First pass: the tables only, so that no row refers to a table not created yet (with
        // foreign keys on, even a deferred reference needs its parent table to exist).
        if !self.second_pass && !matches!(kind, Kind::Table(_)) {
            return Ok(());
        }
        match kind {
            Kind::DeferForeignKeys => Ok(()),
            Kind::Deferred(object, name) => {
                let held: usize = self.deferred.iter().map(|d| d.sql.len()).sum();
                if held + stmt.len() > MAX_DEFERRED {
                    return Err(RewriteError::SchemaTooLarge);
                }
                self.deferred.push(Deferred { object, name, sql: stmt.to_string() });
                Ok(())
            }
            Kind::Table(_) if self.second_pass => Ok(()),
            Kind::Table(name) => {
                if name.eq_ignore_ascii_case(PIECES) {
                    return Err(RewriteError::ReservedName);
                }
                if self.replace {
                    self.emit(out, &format!("DROP TABLE IF EXISTS {};", quote_name(&name)));
                }
                self.checked(stmt, out)
            }
            Kind::Insert(table) if stmt.len() > MAX_STATEMENT => self.split(stmt, &table, out),
            Kind::Insert(_) | Kind::Other => self.checked(stmt, out),
        }
    }

    fn checked(&mut self, stmt: &str, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if stmt.len() > MAX_STATEMENT {
            let head: String = stmt.chars().take(60).collect();
            return Err(RewriteError::TooLong { head, bytes: stmt.len() });
        }
        self.emit(out, stmt);
        Ok(())
    }

    /// An `INSERT` over the cap: its longest values go through the helper table.
    fn split(&mut self, stmt: &str, table: &str, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let unsplittable = || RewriteError::Unsplittable { table: table.to_string(), bytes: stmt.len() };
        let (head, raw) = parse_insert(stmt).ok_or_else(unsplittable)?;
        let values: Vec<Value<'_>> = raw.iter().map(|r| parse_value(r)).collect();
        let mut exprs: Vec<String> = raw.iter().map(|r| r.trim().to_string()).collect();
        let length = |exprs: &[String]| head.len() + exprs.iter().map(|e| e.len() + 1).sum::<usize>() + 1;
        let mut order: Vec<usize> = (0..values.len()).filter(|&i| values[i].splittable()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(raw[i].len()));
        let mut moved = Vec::new();
        for i in order {
            if length(&exprs) <= MAX_STATEMENT {
                break;
            }
            exprs[i] = values[i].read_back(i);
            moved.push(i);
        }
        if length(&exprs) > MAX_STATEMENT {
            return Err(unsplittable());
        }
        let pieces = quote_name(PIECES);
        if !self.pieces_table {
            self.pieces_table = true;
            self.emit(out, &format!("CREATE TABLE IF NOT EXISTS {pieces} (n INTEGER PRIMARY KEY, v);"));
        }
        let budget = MAX_STATEMENT - 100 - pieces.len();
        for &i in &moved {
            for (k, piece) in values[i].pieces(budget).iter().enumerate() {
                let sql = if k == 0 {
                    format!("INSERT INTO {pieces} (n, v) VALUES({i}, {piece});")
                } else {
                    format!("UPDATE {pieces} SET v = v || {piece} WHERE n = {i};")
                };
                self.emit(out, &sql);
            }
        }
        self.emit(out, &format!("{head}{});", exprs.join(",")));
        self.emit(out, &format!("DELETE FROM {pieces};"));
        self.split_rows += 1;
        Ok(())
    }

    /// Ends the first pass (the tables): from now on every other statement is written.
    pub fn start_second_pass(&mut self) {
        self.second_pass = true;
    }

    /// Writes what was held back, in an order D1 accepts: indexes, views (each after the views
    /// it names), triggers; then drops the helper table.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.begun {
            self.begun = true;
            self.emit(out, "PRAGMA defer_foreign_keys=TRUE;");
        }
        let deferred = std::mem::take(&mut self.deferred);
        let (views, rest): (Vec<_>, Vec<_>) = deferred.into_iter().partition(|d| d.object == Object::View);
        let (indexes, triggers): (Vec<_>, Vec<_>) = rest.into_iter().partition(|d| d.object == Object::Index);
        for d in indexes.iter().chain(view_order(views).iter()).chain(triggers.iter()) {
            if self.replace {
                let what = match d.object {
                    Object::Index => "INDEX",
                    Object::View => "VIEW",
                    Object::Trigger => "TRIGGER",
                };
                self.emit(out, &format!("DROP {what} IF EXISTS {};", quote_name(&d.name)));
            }
            self.emit(out, &d.sql);
        }
        if self.pieces_table {
            self.emit(out, &format!("DROP TABLE IF EXISTS {};", quote_name(PIECES)));
        }
    }
}

/// Views ordered so that each comes after the views whose names it mentions (dump order
/// otherwise; a cycle keeps dump order).
fn view_order(views: Vec<Deferred>) -> Vec<Deferred> {
    let names: Vec<String> = views.iter().map(|v| v.name.to_lowercase()).collect();
    let mentions: Vec<BTreeSet<usize>> = views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut t = Tokens::new(&v.sql);
            let mut found = BTreeSet::new();
            // Skip `CREATE VIEW name`: the body's names only.
            while let Some(tok) = t.next_token() {
                if matches!(&tok, Token::Word(w) if w.eq_ignore_ascii_case("AS")) {
                    break;
                }
            }
            while let Some(tok) = t.next_token() {
                let n = match tok {
                    Token::Word(w) | Token::Name(w) => w.to_lowercase(),
                    Token::Punct(_) => continue,
                };
                if let Some(j) = names.iter().position(|x| *x == n) {
                    if j != i {
                        found.insert(j);
                    }
                }
            }
            found
        })
        .collect();
    let mut done = vec![false; views.len()];
    let mut order = Vec::with_capacity(views.len());
    while order.len() < views.len() {
        let ready = (0..views.len()).find(|&i| !done[i] && mentions[i].iter().all(|&j| done[j]));
        let next = ready.or_else(|| (0..views.len()).find(|&i| !done[i]));
        let Some(i) = next else { break };
        done[i] = true;
        order.push(i);
    }
    let mut slots: Vec<Option<Deferred>> = views.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// One input of a staged import: the dump, then any extra SQL artifacts after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// Its R2 key.
    pub key: String,
    /// Its size (of its plaintext, when it is encrypted).
    pub size: u64,
    /// An encrypted (age) artifact: the size of the file R2 holds; it is read by
    /// [`crate::encryption::window`]s and decrypted as it is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<u64>,
}

/// A staged import in progress: the rewritten dump is written to R2 as numbered chunks, step by
/// step, with the MD5 of everything written so far (D1's import needs it before the upload).
/// Every input is read twice ([`RewriteState::second_pass`]): tables, then the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    /// What goes in, in order.
    pub inputs: Vec<Input>,
    /// The input being read.
    pub input: usize,
    /// Where in it the next statement starts.
    pub offset: u64,
    /// The R2 key prefix of the staged chunks (`<prefix>NNNNN.sql`).
    pub prefix: String,
    /// The sizes of the chunks written so far.
    pub chunks: Vec<u64>,
    /// Hex of the serialized MD5 state over every chunk so far.
    pub md5_state: String,
    /// The rewriter.
    pub rewrite: RewriteState,
    /// Every input was read and the held-back statements written.
    pub done: bool,
}

/// What one staging step read and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOut {
    /// The chunk to write, at [`Staging::chunk_key`] of the new last chunk (none when empty).
    pub chunk: Vec<u8>,
}

impl Staging {
    /// A staging of `inputs` under `prefix`.
    pub fn new(inputs: Vec<Input>, prefix: String, replace: bool) -> Self {
        Self {
            inputs,
            input: 0,
            offset: 0,
            prefix,
            chunks: Vec::new(),
            md5_state: hex::encode(Md5::new().serialize().as_slice()),
            rewrite: RewriteState::new(replace),
            done: false,
        }
    }

    /// The key of chunk `i` (from 0).
    pub fn chunk_key(&self, i: usize) -> String {
        format!("{}{:05}.sql", self.prefix, i)
    }

    /// The bytes staged so far.
    pub fn size(&self) -> u64 {
        self.chunks.iter().sum()
    }

    /// The range the next step reads: `(key, offset, length)`; `None` when every input is read.
    pub fn next_read(&self, step_bytes: u64) -> Option<(String, u64, u64)> {
        let input = self.inputs.get(self.input)?;
        let len = (step_bytes + MAX_INPUT_STATEMENT as u64).min(input.size.saturating_sub(self.offset));
        Some((input.key.clone(), self.offset, len))
    }

    fn md5(&self) -> Result<Md5, RewriteError> {
        let bytes = hex::decode(&self.md5_state).map_err(|_| RewriteError::CorruptState)?;
        let array = SerializedState::<Md5>::try_from(bytes.as_slice()).map_err(|_| RewriteError::CorruptState)?;
        Md5::deserialize(&array).map_err(|_| RewriteError::CorruptState)
    }

    /// The MD5 of everything staged, once [`Staging::done`].
    pub fn final_md5(&self) -> Result<String, RewriteError> {
        Ok(hex::encode(self.md5()?.finalize()))
    }

    /// One step: `data` holds the current input from [`Staging::offset`] (as
    /// [`Staging::next_read`] asked; `None` once every input is read). Whole statements are
    /// rewritten until `step_bytes` are consumed; the state moves past them. The caller writes
    /// the returned chunk, then persists the new state.
    pub fn step(&mut self, data: Option<&[u8]>, step_bytes: u64) -> Result<StepOut, RewriteError> {
        let mut out = Vec::new();
        match (data, self.inputs.get(self.input)) {
            (Some(data), Some(input)) => {
                let at_end = self.offset + data.len() as u64 >= input.size;
                let mut pos = 0usize;
                while (pos as u64) < step_bytes.max(1) && pos < data.len() {
                    let rest = &data[pos..];
                    let end = match statement_end(rest) {
                        Some(e) => e,
                        None if at_end => rest.len(),
                        None if pos > 0 => break,
                        None => return Err(RewriteError::Unterminated { key: input.key.clone(), offset: self.offset }),
                    };
                    let text = String::from_utf8_lossy(&rest[..end]);
                    self.rewrite.statement(&text, &mut out)?;
                    pos += end;
                }
                self.offset += pos as u64;
                if self.offset >= input.size {
                    self.input += 1;
                    self.offset = 0;
                }
            }
            _ if !self.rewrite.second_pass => {
                self.rewrite.start_second_pass();
                self.input = 0;
                self.offset = 0;
            }
            _ => {
                self.rewrite.finish(&mut out);
                self.done = true;
            }
        }
        if !out.is_empty() {
            let mut md5 = self.md5()?;
            md5.update(&out);
            self.md5_state = hex::encode(md5.serialize().as_slice());
            self.chunks.push(out.len() as u64);
        }
        Ok(StepOut { chunk: out })
    }
}

#[cfg(test)]
#[path = "d1_sql_tests.rs"]
mod tests;
