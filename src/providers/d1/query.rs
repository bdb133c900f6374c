//! What D1's export cannot carry, read through the query API (`POST …/database/{id}/query`,
//! `{sql}` → `result: [{results: [rows as objects], success, meta}]`, as in `cloudflare-typescript`
//! `src/resources/d1/database.ts`).
//!
//! - **Virtual tables.** D1 refuses to export a database holding one ("cannot export databases
//!   with Virtual Tables (fts5)", D1 import/export docs), and then blocks every query until the
//!   refused export times out (`workers-sdk#9519`, `#9578`). Before exporting, Ferry reads
//!   `sqlite_schema` and `PRAGMA table_list` ([`plan`]) and, when virtual tables exist, sends an
//!   explicit `dump_options.tables` list without them and their shadow tables (miniflare's
//!   `dumpSql.ts` applies the table filter before its virtual-table check; the same filter drops
//!   indexes, triggers and views unless their own names are listed, so every one is listed).
//! - **Integers beyond 2^53.** D1's export passes every value through a JavaScript number
//!   (import/export docs). Before exporting, Ferry scans each ordinary table in windows of rowids
//!   for integers whose magnitude exceeds 2^53 ([`ScanTable`]), and records which columns hold them.
//!
//! Both go into one generated artifact, [`FILENAME`], written page by page like the Aura graph
//! export ([`QueryWriter`], cursor persisted between slices): `CREATE VIRTUAL TABLE` and the rows of
//! each virtual table (an external-content FTS5 table gets `INSERT INTO t(t) VALUES('rebuild')`
//! instead of rows), then `UPDATE t SET c = <exact> WHERE rowid = <r>` for every such integer.
//! A restore imports the dump, then this file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::time::Timestamp;
use crate::transfer::Generator;

use super::DumpOptions;

/// The generated artifact's file name.
pub const FILENAME: &str = "ferry_query_export.sql";
/// The `role` its manifest `details` carry, so a restore tells it from the dump.
pub const ROLE: &str = "d1_query_export";
/// What an extra SQL artifact's `details.d1_import` says: import it after the dump. The query
/// artifact carries it; a restore stages every artifact so marked right after the dump.
pub const AFTER_DUMP: &str = "after_dump";
/// 2^53: integers beyond it in magnitude do not survive a JavaScript number.
const EXACT_LIMIT: &str = "9007199254740992";

/// One row of `sqlite_schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaObject {
    /// `table`, `index`, `view` or `trigger`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its name.
    pub name: String,
    /// The table it belongs to.
    pub tbl_name: String,
    /// Its DDL (`None` for automatic indexes).
    pub sql: Option<String>,
}

/// How a virtual table's rows are recreated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// Rows read back and inserted (FTS5 with its own content, other modules).
    Rows,
    /// External-content FTS5 (`content=tbl`): created, then rebuilt from its content table.
    External,
    /// Contentless FTS5 (`content=''`): its rows cannot be read back; created empty.
    Contentless,
}

/// A virtual table to recreate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualTable {
    /// Its name.
    pub name: String,
    /// Its `CREATE VIRTUAL TABLE` statement.
    pub sql: String,
    /// How its rows come back.
    pub content: Content,
}

/// An ordinary table scanned for integers beyond 2^53.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanTable {
    /// Its name.
    pub name: String,
    /// Its columns, once read (`PRAGMA table_info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Per column: the scan windows that found integers beyond 2^53 in it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub big: BTreeMap<String, u64>,
    /// Whether its rowid is a column (`INTEGER PRIMARY KEY`), so the dump carries it. Otherwise the
    /// dump lists no rowid and an import into an empty table numbers the rows 1, 2, … in rowid
    /// order: a patch then names the row by its position.
    #[serde(default)]
    pub rowid_alias: bool,
    /// The `INTEGER PRIMARY KEY` column (the rowid's alias), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// What goes through the export and what through the query API, decided before exporting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryPlan {
    /// Whether the export is sent at all (not when every selected table is virtual).
    pub export: bool,
    /// The `dump_options.tables` sent to D1 (empty: as configured).
    pub dump_tables: Vec<String>,
    /// Virtual tables captured through the query API.
    pub virtual_tables: Vec<VirtualTable>,
    /// Tables scanned for integers beyond 2^53.
    pub scan: Vec<ScanTable>,
    /// The table being scanned (index into `scan`).
    pub scan_at: usize,
    /// The last rowid scanned in it (as text: rowids are 64-bit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_after: Option<String>,
    /// Whether schema rows are wanted in the query artifact (not with `no_schema`).
    pub schema: bool,
    /// Whether rows are wanted (not with `no_data`).
    pub data: bool,
    /// What the job should say about it (contentless tables, tables that cannot be scanned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl QueryPlan {
    /// Whether the scan is over.
    pub fn scanned(&self) -> bool {
        self.scan_at >= self.scan.len()
    }

    /// `table.column` → scan windows that found integers beyond 2^53 in it.
    pub fn big_columns(&self) -> BTreeMap<String, u64> {
        self.scan.iter().flat_map(|t| t.big.iter().map(move |(c, n)| (format!("{}.{c}", t.name), *n))).collect()
    }

    /// Whether the backup needs the query artifact.
    pub fn needs_artifact(&self) -> bool {
        !self.virtual_tables.is_empty() || self.scan.iter().any(|t| !t.big.is_empty())
    }

    /// What the manifest records about which table came by which path.
    pub fn references(&self) -> Value {
        json!({
            "dump_tables": self.dump_tables,
            "query_tables": self.virtual_tables.iter().map(|v| &v.name).collect::<Vec<_>>(),
            "exact_integer_columns": self.big_columns().into_keys().collect::<Vec<_>>(),
            "export": self.export,
        })
    }
}

/// `"name"`, with embedded quotes doubled.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn is_internal(name: &str) -> bool {
    name.starts_with("_cf_") || (name.starts_with("sqlite_") && name != "sqlite_sequence" && !is_stat(name))
}

fn is_stat(name: &str) -> bool {
    name.starts_with("sqlite_stat")
}

fn is_virtual(sql: &str) -> bool {
    let words: Vec<String> = sql.split_whitespace().take(3).map(str::to_ascii_uppercase).collect();
    words == ["CREATE", "VIRTUAL", "TABLE"]
}

fn without_rowid(sql: &str) -> bool {
    let upper = sql.to_ascii_uppercase();
    let words: Vec<&str> =
        upper.split(|c: char| !c.is_ascii_alphanumeric() && c != '_').filter(|w| !w.is_empty()).collect();
    words.windows(2).any(|w| w == ["WITHOUT", "ROWID"])
}

/// The module arguments of `CREATE VIRTUAL TABLE … USING module(args)`, split at top-level commas.
fn module_args(sql: &str) -> Vec<String> {
    let Some(open) = sql.find('(') else { return Vec::new() };
    let mut args = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for c in sql[open + 1..].chars() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            (Some(_), c) => current.push(c),
            (None, '\'' | '"' | '`') => {
                quote = Some(c);
                current.push(c);
            }
            (None, '[') => {
                quote = Some(']');
                current.push(c);
            }
            (None, '(') => {
                depth += 1;
                current.push(c);
            }
            (None, ')') if depth == 0 => break,
            (None, ')') => {
                depth -= 1;
                current.push(c);
            }
            (None, ',') if depth == 0 => args.push(std::mem::take(&mut current).trim().to_string()),
            (None, c) => current.push(c),
        }
    }
    if !current.trim().is_empty() {
        args.push(current.trim().to_string());
    }
    args
}

/// How an FTS5 table's rows come back, from its `content=` option (other modules: rows).
fn content_of(sql: &str) -> Content {
    let module = sql
        .to_ascii_lowercase()
        .split_once(" using ")
        .map(|(_, rest)| rest.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric()).collect::<String>())
        .unwrap_or_default();
    if module != "fts5" {
        return Content::Rows;
    }
    for arg in module_args(sql) {
        let Some((key, value)) = arg.split_once('=') else { continue };
        if key.trim().eq_ignore_ascii_case("content") {
            let value = value.trim().trim_matches(|c| c == '\'' || c == '"' || c == '`');
            return if value.is_empty() { Content::Contentless } else { Content::External };
        }
    }
    Content::Rows
}

/// Decides, from `sqlite_schema` and the names `PRAGMA table_list` calls `shadow`, which objects go
/// through the export and which through the query API.
pub fn plan(objects: &[SchemaObject], shadows: &BTreeSet<String>, options: &DumpOptions) -> QueryPlan {
    let wanted = |name: &str| options.tables.is_empty() || options.tables.iter().any(|t| t == name);
    let virtual_names: BTreeSet<&str> = objects
        .iter()
        .filter(|o| o.kind == "table" && o.sql.as_deref().is_some_and(is_virtual))
        .map(|o| o.name.as_str())
        .collect();
    let left_out = |o: &SchemaObject| {
        virtual_names.contains(o.name.as_str())
            || virtual_names.contains(o.tbl_name.as_str())
            || shadows.contains(&o.name)
            || shadows.contains(&o.tbl_name)
    };
    let mut plan = QueryPlan { export: true, schema: !options.no_schema, data: !options.no_data, ..Default::default() };
    for o in objects.iter().filter(|o| o.kind == "table" && wanted(&o.name)) {
        let Some(sql) = o.sql.as_deref() else { continue };
        if virtual_names.contains(o.name.as_str()) {
            let content = content_of(sql);
            if content == Content::Contentless && plan.data {
                plan.notes.push(format!(
                    "virtual table {} is a contentless FTS5 table: its rows cannot be read back, so the backup \
                     recreates it empty (refill it from its source)",
                    o.name
                ));
            }
            plan.virtual_tables.push(VirtualTable { name: o.name.clone(), sql: sql.to_string(), content });
        } else if !left_out(o) && !is_internal(&o.name) && !is_stat(&o.name) && o.name != "sqlite_sequence" && plan.data
        {
            if without_rowid(sql) {
                plan.notes.push(format!(
                    "table {} is WITHOUT ROWID: Ferry cannot check it for integers beyond 2^53, which D1's export \
                     rounds",
                    o.name
                ));
            } else {
                plan.scan.push(ScanTable {
                    name: o.name.clone(),
                    columns: None,
                    big: BTreeMap::new(),
                    rowid_alias: false,
                    key: None,
                });
            }
        }
    }
    if plan.virtual_tables.is_empty() {
        // Nothing D1 would refuse: the export runs exactly as configured.
        return plan;
    }
    let mut seen = BTreeSet::new();
    plan.dump_tables = objects
        .iter()
        .filter(|o| wanted(&o.name) && !left_out(o) && !o.name.starts_with("_cf_"))
        .filter(|o| o.kind == "table" || o.sql.is_some())
        .filter(|o| !is_internal(&o.name))
        .filter(|o| seen.insert(o.name.clone()))
        .map(|o| o.name.clone())
        .collect();
    // An empty list would mean "every table", virtual ones included, which D1 refuses.
    plan.export = plan.dump_tables.iter().any(|name| objects.iter().any(|o| &o.name == name && o.kind == "table"));
    plan
}

/// The rows of a query API answer (`result[0].results`), each an object keyed by column.
pub fn rows(resp: &HttpResponse, now: Timestamp, what: &str) -> Result<Vec<Map<String, Value>>, StepError> {
    let body = super::envelope(resp, now, Some(what))?;
    let results = body
        .pointer("/result/0/results")
        .and_then(Value::as_array)
        .ok_or_else(|| StepError::permanent(format!("D1 API ({what}): received a malformed response (no results)")))?;
    Ok(results.iter().filter_map(Value::as_object).cloned().collect())
}

/// The `sqlite_schema` rows of an answer.
pub fn schema_objects(rows: &[Map<String, Value>]) -> Vec<SchemaObject> {
    rows.iter()
        .filter_map(|r| {
            let text = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
            Some(SchemaObject {
                kind: text("type")?,
                name: text("name")?,
                tbl_name: text("tbl_name")?,
                sql: text("sql"),
            })
        })
        .collect()
}

/// The names `PRAGMA table_list` calls `shadow` (tables a virtual table keeps its data in).
pub fn shadow_names(rows: &[Map<String, Value>]) -> BTreeSet<String> {
    rows.iter()
        .filter(|r| r.get("schema").and_then(Value::as_str).is_none_or(|s| s == "main"))
        .filter(|r| r.get("type").and_then(Value::as_str) == Some("shadow"))
        .filter_map(|r| r.get("name").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// The `INTEGER PRIMARY KEY` column (the rowid's alias) of a `PRAGMA table_info` answer.
pub fn rowid_key(rows: &[Map<String, Value>]) -> Option<String> {
    if !rowid_alias(rows) {
        return None;
    }
    rows.iter()
        .find(|r| r.get("pk").and_then(Value::as_i64).unwrap_or(0) > 0)
        .and_then(|r| r.get("name").and_then(Value::as_str))
        .map(str::to_string)
}

/// Whether a `PRAGMA table_info` answer shows an `INTEGER PRIMARY KEY` (the rowid's alias).
pub fn rowid_alias(rows: &[Map<String, Value>]) -> bool {
    let keys: Vec<&Map<String, Value>> =
        rows.iter().filter(|r| r.get("pk").and_then(Value::as_i64).unwrap_or(0) > 0).collect();
    matches!(keys.as_slice(), [one] if one.get("type").and_then(Value::as_str).is_some_and(|t| t.eq_ignore_ascii_case("INTEGER")))
}

/// The column names of a `PRAGMA table_info` answer, in order.
pub fn column_names(rows: &[Map<String, Value>]) -> Vec<String> {
    rows.iter().filter_map(|r| r.get("name").and_then(Value::as_str).map(str::to_string)).collect()
}

fn beyond(column: &str) -> String {
    let c = ident(column);
    format!("(typeof({c})='integer' AND ({c} > {EXACT_LIMIT} OR {c} < -{EXACT_LIMIT}))")
}

fn after_clause(after: Option<&str>) -> String {
    after.map(|a| format!(" WHERE rowid > {a}")).unwrap_or_default()
}

/// One scan window's question: for `window` rows after `after`, whether each column holds an
/// integer beyond 2^53, the last rowid (as text) and the number of rows looked at.
pub fn scan_sql(table: &str, columns: &[String], after: Option<&str>, window: u32) -> String {
    let flags: Vec<String> = columns.iter().enumerate().map(|(i, c)| format!("max({}) AS f{i}", beyond(c))).collect();
    let picked: Vec<String> = columns.iter().map(|c| ident(c)).collect();
    format!(
        "SELECT count(*) AS n, CAST(max(rowid) AS TEXT) AS last, {} FROM (SELECT rowid, {} FROM {}{} ORDER BY rowid \
         LIMIT {window})",
        flags.join(", "),
        picked.join(", "),
        ident(table),
        after_clause(after)
    )
}

/// Folds one scan window's answer into the plan: counts per column, the cursor, the next table.
pub fn on_scan(plan: &mut QueryPlan, rows: &[Map<String, Value>], window: u32) -> Result<(), StepError> {
    let Some(table) = plan.scan.get_mut(plan.scan_at) else { return Ok(()) };
    let row = rows.first().ok_or_else(|| scan_malformed("no row"))?;
    let n = row.get("n").and_then(Value::as_u64).ok_or_else(|| scan_malformed("no count"))?;
    let columns = table.columns.clone().unwrap_or_default();
    for (i, column) in columns.iter().enumerate() {
        if row.get(&format!("f{i}")).and_then(Value::as_i64).unwrap_or(0) > 0 {
            *table.big.entry(column.clone()).or_default() += 1;
        }
    }
    let last = row.get("last").and_then(Value::as_str).filter(|l| is_integer(l)).map(str::to_string);
    if n < u64::from(window) || last.is_none() {
        if let Some(key) = table.key.as_ref().filter(|k| table.big.contains_key(*k)) {
            // The row is named by its key, which D1's export rounds: no patch can find it.
            let note = format!(
                "table {} column {key}: its INTEGER PRIMARY KEY holds integers beyond 2^53, which D1's export \
                 rounds; Ferry cannot restore those keys exactly (nor patch other columns of their rows), and a \
                 drill fails naming the table",
                table.name
            );
            plan.notes.push(note);
        }
        plan.scan_at += 1;
        plan.scan_after = None;
    } else {
        plan.scan_after = last;
    }
    Ok(())
}

fn scan_malformed(what: &str) -> StepError {
    StepError::permanent(format!("D1 API (scanning for integers beyond 2^53): received a malformed response ({what})"))
}

/// `-?[0-9]+`.
fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `s` is one SQL literal as SQLite's `quote()` writes it: `NULL`, a number, a string or a
/// blob. Anything else in an answer is refused rather than written into a file a restore executes.
pub fn is_literal(s: &str) -> bool {
    if s == "NULL" {
        return true;
    }
    if let Some(hex) = s.strip_prefix("X'").and_then(|r| r.strip_suffix('\'')) {
        return hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    if let Some(body) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        // Every quote inside is doubled.
        return body.split("''").all(|piece| !piece.contains('\''));
    }
    let number = s.strip_prefix('-').unwrap_or(s);
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && number.as_bytes()[0].is_ascii_digit()
}

/// Where the query artifact stopped between slices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryCursor {
    /// The item being written: virtual tables first, then the tables with integers to patch.
    pub item: usize,
    /// The current item's columns, once read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// The last rowid read in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Rows of the current table looked at so far (a patch of a table without a rowid column
    /// names its row by position).
    #[serde(default)]
    pub seen: u64,
    /// Whether the header comment is written.
    pub started: bool,
    /// Statements written so far.
    pub statements: u64,
    /// Rows written per virtual table.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rows: BTreeMap<String, u64>,
    /// Exact values written per `table.column`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exact: BTreeMap<String, u64>,
    /// The page size in use, once lowered because a page was too large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_rows: Option<u32>,
    /// What a drill compares, per item read so far (its columns and prints).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<usize, DrillCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Virtual(VirtualTable),
    Patch { table: String, columns: Vec<String>, rowid_alias: bool },
}

/// The query artifact of one backup: what to read, where and how.
#[derive(Clone, PartialEq)]
pub struct QueryExport {
    url: String,
    authorization: String,
    items: Vec<Item>,
    schema: bool,
    data: bool,
    page_rows: u32,
}

impl fmt::Debug for QueryExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryExport").field("url", &self.url).field("items", &self.items).finish_non_exhaustive()
    }
}

impl QueryExport {
    /// The artifact of `plan`, read from `url` (the database's `/query`) with `authorization`.
    pub fn new(url: String, authorization: String, plan: &QueryPlan, page_rows: u32) -> Self {
        let mut items: Vec<Item> = plan.virtual_tables.iter().cloned().map(Item::Virtual).collect();
        items.extend(plan.scan.iter().filter(|t| !t.big.is_empty()).map(|t| Item::Patch {
            table: t.name.clone(),
            columns: t.big.keys().cloned().collect(),
            rowid_alias: t.rowid_alias,
        }));
        Self { url, authorization, items, schema: plan.schema, data: plan.data, page_rows: page_rows.max(1) }
    }

    /// Goes on from where an earlier slice stopped (from the start without a cursor).
    pub fn resume(&self, cursor: Option<&QueryCursor>) -> QueryWriter {
        let cursor = cursor.cloned().unwrap_or_default();
        let mut spec = self.clone();
        if let Some(lowered) = cursor.page_rows {
            spec.page_rows = lowered.clamp(1, self.page_rows);
        }
        let mut writer = QueryWriter { spec, cursor, out: Vec::new() };
        if !writer.cursor.started {
            writer.out.extend_from_slice(
                b"-- Ferry: what D1's export cannot carry, read through the D1 query API.\n\
                  -- Import it after the dump: virtual tables, then exact integers beyond 2^53.\n",
            );
            writer.cursor.started = true;
        }
        writer.settle();
        writer
    }
}

/// The running query artifact: one page of rows in memory at a time.
pub struct QueryWriter {
    spec: QueryExport,
    cursor: QueryCursor,
    out: Vec<u8>,
}

impl QueryWriter {
    fn statement(&mut self, sql: &str) {
        self.out.extend_from_slice(sql.as_bytes());
        self.out.extend_from_slice(b"\n");
        self.cursor.statements += 1;
    }

    fn next_item(&mut self) {
        self.cursor.item += 1;
        self.cursor.columns = None;
        self.cursor.after = None;
        self.cursor.seen = 0;
    }

    /// Writes what needs no request (an external-content table's create and rebuild) until the
    /// current item needs one, or every item is written.
    fn settle(&mut self) {
        while let Some(item) = self.spec.items.get(self.cursor.item).cloned() {
            match item {
                Item::Virtual(v) if self.cursor.columns.is_none() && self.cursor.after.is_none() => {
                    let needs_rows = v.content == Content::Rows && self.spec.data;
                    if needs_rows {
                        return;
                    }
                    if self.spec.schema {
                        self.statement(&format!("{};", v.sql));
                    }
                    if v.content == Content::External && self.spec.data {
                        let name = ident(&v.name);
                        self.statement(&format!("INSERT INTO {name}({name}) VALUES('rebuild');"));
                    }
                    self.next_item();
                }
                Item::Patch { .. } if !self.spec.data => self.next_item(),
                Item::Virtual(_) | Item::Patch { .. } => return,
            }
        }
    }

    /// Where it stands, for the next slice, with the bytes not taken yet.
    pub fn end_slice(mut self) -> (Vec<u8>, QueryCursor) {
        self.cursor.page_rows = Some(self.spec.page_rows);
        (std::mem::take(&mut self.out), self.cursor)
    }

    /// The last bytes and the artifact's `details`: its role, rows per virtual table, exact values
    /// per column.
    pub fn finish(mut self) -> (Vec<u8>, Value) {
        let big: Vec<&String> = self.cursor.exact.keys().collect();
        let mut warnings = Vec::new();
        if !big.is_empty() {
            warnings.push(format!(
                "integers beyond 2^53 in {}: D1's export rounds them; their exact values are in {FILENAME}, which a \
                 restore applies after the dump",
                big.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let details = json!({
            "role": ROLE,
            "d1_import": AFTER_DUMP,
            "statements": self.cursor.statements,
            "virtual_tables": self.spec.items.iter().filter_map(|i| match i {
                Item::Virtual(v) => Some(json!({
                    "name": v.name,
                    "content": v.content,
                    "rows": self.cursor.rows.get(&v.name).copied().unwrap_or(0),
                })),
                Item::Patch { .. } => None,
            }).collect::<Vec<_>>(),
            "exact_integers": self.cursor.exact,
            "drill_checks": self.cursor.checks.values().collect::<Vec<_>>(),
            "warnings": warnings,
        });
        (std::mem::take(&mut self.out), details)
    }
}

impl Generator for QueryWriter {
    /// The next query, or `None` when everything is written.
    fn next_request(&self) -> Option<HttpRequest> {
        let item = self.spec.items.get(self.cursor.item)?;
        let (table, columns) = match item {
            Item::Virtual(v) => (&v.name, None),
            Item::Patch { table, columns, .. } => (table, Some(columns)),
        };
        let after = self.cursor.after.as_deref();
        let sql = match (&self.cursor.columns, item) {
            (None, Item::Virtual(_)) => format!("PRAGMA table_info({})", ident(table)),
            (Some(cols), Item::Virtual(_)) => rows_page_sql(table, cols, after, self.spec.page_rows),
            (_, Item::Patch { .. }) => {
                exact_page_sql(table, &columns.cloned().unwrap_or_default(), after, self.spec.page_rows)
            }
        };
        Some(
            HttpRequest::post_json(self.spec.url.clone(), &json!({ "sql": sql }))
                .header("authorization", self.spec.authorization.clone()),
        )
    }

    /// Writes one answer.
    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<(), StepError> {
        let Some(item) = self.spec.items.get(self.cursor.item).cloned() else { return Ok(()) };
        let rows = rows(resp, now, "reading a table D1's export cannot carry")?;
        match (item, self.cursor.columns.clone()) {
            (Item::Virtual(v), None) => {
                let columns = column_names(&rows);
                if columns.is_empty() {
                    return Err(StepError::permanent(format!("D1 reports no columns for virtual table {}", v.name)));
                }
                if self.spec.schema {
                    self.statement(&format!("{};", v.sql));
                }
                self.cursor.columns = Some(columns);
            }
            (Item::Virtual(v), Some(columns)) => {
                let names: Vec<String> = columns.iter().map(|c| ident(c)).collect();
                let prefix = format!("INSERT INTO {}(rowid, {}) VALUES(", ident(&v.name), names.join(", "));
                let at = self.cursor.item;
                self.cursor
                    .checks
                    .entry(at)
                    .or_insert_with(|| DrillCheck::fresh(&v.name, CheckKind::Rows, columns.clone()));
                for row in &rows {
                    let rowid = rowid_of(row)?;
                    let line = row_line(&rowid, &literal_values(row, &v.name, &columns)?);
                    self.statement(&format!("{prefix}{line});"));
                    if let Some(p) = self.cursor.checks.get_mut(&at).and_then(|c| c.prints.first_mut()) {
                        p.add(&line);
                    }
                    *self.cursor.rows.entry(v.name.clone()).or_default() += 1;
                    self.cursor.after = Some(rowid);
                }
                if rows.len() < self.spec.page_rows as usize {
                    self.next_item();
                }
            }
            (Item::Patch { table, columns, rowid_alias }, _) => {
                let at = self.cursor.item;
                self.cursor
                    .checks
                    .entry(at)
                    .or_insert_with(|| DrillCheck::fresh(&table, CheckKind::Exact, columns.clone()));
                if rows.is_empty() {
                    self.next_item();
                } else {
                    let seen = self.cursor.seen;
                    for row in &rows {
                        let rowid = rowid_of(row)?;
                        let n = row.get("n").and_then(Value::as_u64).ok_or_else(|| {
                            StepError::permanent("D1 API (query export): received a malformed response (no row number)")
                        })?;
                        // The row as the restored table will know it.
                        let target = if rowid_alias { rowid.clone() } else { (seen + n).to_string() };
                        self.cursor.seen = seen + n;
                        let values = exact_values(row, &table, &columns)?;
                        for (i, (column, value)) in columns.iter().zip(values).enumerate() {
                            let Some(value) = value else { continue };
                            self.statement(&format!(
                                "UPDATE {} SET {} = {value} WHERE rowid = {target};",
                                ident(&table),
                                ident(column)
                            ));
                            if let Some(p) = self.cursor.checks.get_mut(&at).and_then(|c| c.prints.get_mut(i)) {
                                p.add(&value);
                            }
                            *self.cursor.exact.entry(format!("{table}.{column}")).or_default() += 1;
                        }
                        self.cursor.after = Some(rowid);
                    }
                }
            }
        }
        self.settle();
        Ok(())
    }

    /// Bytes written so far (drained).
    fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// A page was over the response cap: halve the page size, down to one row.
    fn shrink_page(&mut self, why: &str) -> Result<u32, StepError> {
        if self.spec.page_rows <= 1 {
            return Err(StepError::permanent(format!(
                "a single row read through the D1 query API is over the response cap ({why})"
            )));
        }
        self.spec.page_rows = (self.spec.page_rows / 2).max(1);
        Ok(self.spec.page_rows)
    }

    fn end_slice(self: Box<Self>, state: &mut crate::transfer::CopyState) -> Result<Vec<u8>, StepError> {
        let (rest, cursor) = (*self).end_slice();
        state.set_cursor(&cursor)?;
        Ok(rest)
    }

    fn finish(self: Box<Self>) -> Result<(Vec<u8>, Value), StepError> {
        Ok((*self).finish())
    }
}

/// What a drill compares a virtual table or an exact-integer column by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// A virtual table's rows (rowid and `quote()` of every column), in rowid order: one print.
    Rows,
    /// The integers beyond 2^53 of each column (`CAST(… AS TEXT)`), in rowid order: one print per
    /// column.
    Exact,
}

/// How many values went by, in a fixed order, and an FNV-1a hash of them (each value followed by
/// a newline). Not a defence against forgery (the manifest's SHA-256 is that): a check that a
/// restore put back exactly what the backup read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Values seen.
    pub count: u64,
    /// FNV-1a 64 of the values, as 16 hex digits (a JSON number would not survive JavaScript).
    #[serde(with = "hex64")]
    pub fnv64: u64,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self { count: 0, fnv64: FNV_OFFSET }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Fingerprint {
    /// Folds in one value.
    pub fn add(&mut self, value: &str) {
        for b in value.bytes().chain(std::iter::once(b'\n')) {
            self.fnv64 = (self.fnv64 ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.count += 1;
    }
}

mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// What the backup read of one table through the query API, for a drill to read back from the
/// restored database and compare (the query artifact's `details.drill_checks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillCheck {
    /// The table.
    pub table: String,
    /// What is compared.
    pub kind: CheckKind,
    /// The columns read.
    pub columns: Vec<String>,
    /// The backup's prints: one for [`CheckKind::Rows`], one per column for [`CheckKind::Exact`].
    pub prints: Vec<Fingerprint>,
}

/// Where a drill's read-back of one [`DrillCheck`] stands (persisted between steps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckProgress {
    /// The last rowid read (as text: rowids are 64-bit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// The restored database's prints so far.
    #[serde(default)]
    pub prints: Vec<Fingerprint>,
}

impl DrillCheck {
    fn fresh(table: &str, kind: CheckKind, columns: Vec<String>) -> Self {
        let n = if kind == CheckKind::Rows { 1 } else { columns.len() };
        Self { table: table.to_string(), kind, columns, prints: vec![Fingerprint::default(); n] }
    }

    /// The next page's question, `page` rows at most, the same one the backup asked.
    pub fn next_sql(&self, progress: &CheckProgress, page: u32) -> String {
        let after = progress.after.as_deref();
        match self.kind {
            CheckKind::Rows => rows_page_sql(&self.table, &self.columns, after, page),
            CheckKind::Exact => exact_page_sql(&self.table, &self.columns, after, page),
        }
    }

    /// Folds one page of the restored database in; `true` when the table is read to its end.
    pub fn fold(
        &self,
        progress: &mut CheckProgress,
        rows: &[Map<String, Value>],
        page: u32,
    ) -> Result<bool, StepError> {
        if progress.prints.len() != self.prints.len() {
            progress.prints = vec![Fingerprint::default(); self.prints.len()];
        }
        for row in rows {
            let rowid = rowid_of(row)?;
            match self.kind {
                CheckKind::Rows => {
                    let values = literal_values(row, &self.table, &self.columns)?;
                    if let Some(p) = progress.prints.first_mut() {
                        p.add(&row_line(&rowid, &values));
                    }
                }
                CheckKind::Exact => {
                    for (i, value) in exact_values(row, &self.table, &self.columns)?.into_iter().enumerate() {
                        if let (Some(v), Some(p)) = (value, progress.prints.get_mut(i)) {
                            p.add(&v);
                        }
                    }
                }
            }
            progress.after = Some(rowid);
        }
        Ok(match self.kind {
            CheckKind::Rows => rows.len() < page as usize,
            CheckKind::Exact => rows.is_empty(),
        })
    }

    /// How the restored database differs from the backup, naming the table (and column).
    pub fn finding(&self, got: &[Fingerprint]) -> Vec<String> {
        let table = ident(&self.table);
        match self.kind {
            CheckKind::Rows => {
                let (want, have) =
                    (self.prints.first().copied().unwrap_or_default(), got.first().copied().unwrap_or_default());
                if want == have {
                    Vec::new()
                } else if want.count != have.count {
                    vec![format!("virtual table {table}: {} rows restored, {} in the backup", have.count, want.count)]
                } else {
                    vec![format!(
                        "virtual table {table}: {} rows restored, but their values differ from the backup's",
                        have.count
                    )]
                }
            }
            CheckKind::Exact => self
                .columns
                .iter()
                .zip(&self.prints)
                .enumerate()
                .filter_map(|(i, (column, want))| {
                    let have = got.get(i).copied().unwrap_or_default();
                    (have != *want).then(|| {
                        format!(
                            "table {table} column {}: {} integers beyond 2^53 restored, {} in the backup{}",
                            ident(column),
                            have.count,
                            want.count,
                            if have.count == want.count { ", with other values" } else { "" }
                        )
                    })
                })
                .collect(),
        }
    }
}

/// A page of a table's rows: the rowid as text and every column as an SQL literal (`quote()`).
fn rows_page_sql(table: &str, columns: &[String], after: Option<&str>, page: u32) -> String {
    let values: Vec<String> = columns.iter().enumerate().map(|(i, c)| format!("quote({}) AS v{i}", ident(c))).collect();
    format!(
        "SELECT CAST(rowid AS TEXT) AS r, {} FROM {}{} ORDER BY rowid LIMIT {page}",
        values.join(", "),
        ident(table),
        after_clause(after),
    )
}

/// A window of `page` rows: the rows holding an integer beyond 2^53 in one of `columns` (exactly,
/// as text), and the window's last row, so the next window starts after it.
fn exact_page_sql(table: &str, columns: &[String], after: Option<&str>, page: u32) -> String {
    let values: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("CASE WHEN {} THEN CAST({} AS TEXT) END AS v{i}", beyond(c), ident(c)))
        .collect();
    let any: Vec<String> = (0..columns.len()).map(|i| format!("v{i} IS NOT NULL")).collect();
    let picked: Vec<String> = columns.iter().map(|c| ident(c)).collect();
    let after = after_clause(after);
    let table = ident(table);
    format!(
        "SELECT * FROM (SELECT CAST(rowid AS TEXT) AS r, rowid AS k, row_number() OVER (ORDER BY rowid) \
         AS n, {} FROM (SELECT rowid, {} FROM {table}{after} ORDER BY rowid LIMIT {page})) WHERE {} OR k = (SELECT \
         max(rowid) FROM (SELECT rowid FROM {table}{after} ORDER BY rowid LIMIT {page}))",
        values.join(", "),
        picked.join(", "),
        any.join(" OR "),
    )
}

/// A row's `v0…` values, each checked to be one SQL literal.
fn literal_values(row: &Map<String, Value>, table: &str, columns: &[String]) -> Result<Vec<String>, StepError> {
    columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let value = row.get(&format!("v{i}")).and_then(Value::as_str).unwrap_or("NULL");
            if is_literal(value) {
                Ok(value.to_string())
            } else {
                Err(StepError::permanent(format!(
                    "D1 answered a value of {table}.{column} that is not an SQL literal; nothing was committed"
                )))
            }
        })
        .collect()
}

/// A row's exact integers (`None` where the column holds none beyond 2^53), each checked.
fn exact_values(row: &Map<String, Value>, table: &str, columns: &[String]) -> Result<Vec<Option<String>>, StepError> {
    columns
        .iter()
        .enumerate()
        .map(|(i, column)| match row.get(&format!("v{i}")).and_then(Value::as_str) {
            None => Ok(None),
            Some(v) if is_integer(v) => Ok(Some(v.to_string())),
            Some(v) => Err(StepError::permanent(format!(
                "D1 answered {v:?} for an integer of {table}.{column}; nothing was committed"
            ))),
        })
        .collect()
}

/// A row as the artifact's `INSERT` lists it after its column names, and as a print takes it.
fn row_line(rowid: &str, values: &[String]) -> String {
    format!("{rowid}, {}", values.join(", "))
}

fn rowid_of(row: &Map<String, Value>) -> Result<String, StepError> {
    row.get("r").and_then(Value::as_str).filter(|r| is_integer(r)).map(str::to_string).ok_or_else(|| {
        StepError::permanent("D1 API (query export): received a malformed response (a row without its rowid)")
    })
}

#[cfg(test)]
mod tests;
