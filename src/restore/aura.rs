//! Neo4j Aura restores and drills, as a phase machine driven by the job engine.
//!
//! - **Snapshot** (`provider-apis.md` §3.2, §3.3): the instance goes back to the snapshot the
//!   backup's manifest recorded: token → `POST /v1/instances/{id}/snapshots/{sid}/restore` (202,
//!   the instance `restoring`) → poll `GET /v1/instances/{id}` until it is no longer `restoring`:
//!   `running` is done, any other status fails naming it. Aura's status may lag the POST (it
//!   answers 202 and still reports `running` before the restore begins; statuses: aura-cli
//!   `api/response.go`, polled as aura-cli `api/poll.go` does), so `running` means done only
//!   once `restoring` was seen, or after the request's `restoring_wait_seconds` (default 600)
//!   without it (a restore quicker than one poll interval), noted on the job. The POST is never
//!   sent again blindly:
//!   when it went unanswered (no answer, or a 5xx), the instance is read first, and a `restoring`
//!   instance means the POST took effect. An instance seen `running` then gets the POST again:
//!   restoring the same snapshot twice leaves the same data. `ongoing-database-operation` (Aura is
//!   busy with another operation) fails the job at once, in Aura's words: retrying blindly could
//!   restore over an operation the operator started.
//! - **Logical** (§3.5): the backup's `graph.jsonl.gz` goes into a named, empty database on the
//!   source's Query API (same host and database user as the export). A target holding any node is
//!   refused before anything is written. The file is read twice, streamed out of R2 in bounded
//!   steps (`runtime/graph_load.rs`): a *scan* checks it (header, nodes before relationships, a
//!   footer whose totals match) and counts nodes per label and relationships per type; the *load*
//!   sends the lines in chunks of `batch_size`, one statement per label set or type within a
//!   chunk, then cleans up in bounded batches (nodes, then relationships). The cursor (lines
//!   done, statements of the current chunk sent) is persisted after every statement, so a step cut
//!   short goes on where it stopped. Every statement is idempotent: nodes and relationships are
//!   `MERGE`d on a helper property (`_ferry_id` here; each load's own name, see below) holding
//!   their id in the export, so a statement Neo4j ran whose
//!   answer was lost (the runtime killed, a timeout) is sent again without duplicating anything.
//! - **Lookups by index** (the "unique import label" of APOC's Cypher export): a `MERGE` on
//!   labels the target has no index for scans those labels, and a relationship's endpoints matched
//!   by property alone scan every node: quadratic on a large graph. So before loading, Ferry makes
//!   `_ferry_id` unique on one temporary label, `_FerryImport`
//!   (`CREATE CONSTRAINT ferry_import_id IF NOT EXISTS ...`); every node is `MERGE`d under that
//!   label and given its own labels with `SET n:L1:L2`, relationships match their endpoints under
//!   it; both are lookups in the constraint's index. The cleanup takes the label and
//!   `_ferry_id` off nodes (`MATCH (n:_FerryImport) WITH n LIMIT $limit REMOVE ...` until none is
//!   left, found by the label's token index), then `_ferry_id` off relationships, and the
//!   constraint is dropped (`DROP CONSTRAINT ferry_import_id IF EXISTS`), so the target ends with
//!   nothing of Ferry's. A constraint rather than a plain index: `CREATE CONSTRAINT` returns once
//!   its index is online (`CREATE INDEX` returns while the index still populates, and statements
//!   planned meanwhile would scan), and it guarantees one node per export id whatever happens.
//!   Both are schema commands, which Neo4j runs only in an implicit transaction: the Query API's
//!   `/query/v2` is one (no `/tx`). A logical load that fails leaves its constraint (harmless:
//!   the next load's `IF NOT EXISTS` keeps it, its end drops it; or `DROP CONSTRAINT
//!   ferry_import_id`). An export with a node labelled `_FerryImport` is refused by the scan. A
//!   load begun before Ferry loaded this way (its persisted cursor says so) goes on with the
//!   statements it began with (keyed by `_ferry_id` alone) and their cleanup.
//! - **The helper property is the load's own.** A source graph may have any property, a
//!   `_ferry_id` included, so each load keys its elements by a property named after its job,
//!   `_ferry_<job id>`, indexed by a constraint of the same job (`ferry_import_<job id>`); the
//!   scan refuses, before anything is loaded, a file that has a property of that name. Loads begun
//!   before (their state says so) go on with `_ferry_id` and `ferry_import_id`.
//! - **Typed values.** A version 2 file holds each property in the Query API's typed JSON; its
//!   rows are sent with `Content-Type: application/vnd.neo4j.query`, every parameter typed, so
//!   Neo4j stores a date as a date, a point as a point, bytes as bytes. A version 1 file (plain
//!   JSON) loads as plain JSON, as it always did.
//! - **Drill** (where: `providers/aura/drill.rs`): into a **scratch instance**, every tier: the
//!   source instance is read (`GET /v1/instances/{id}`: tenant, cloud provider, region, type,
//!   memory), an instance `ferry-drill-<job id>` is created (`POST /v1/instances`; the answer
//!   carries its `connection_url` and generated password, kept as `secret_password` until the
//!   job ends), awaited until `running`, loaded and counted as below, and deleted
//!   (`DELETE /v1/instances/{id}`; a 409 while it is busy is retried until
//!   `drill_scratch.create_timeout_minutes`), also when a step failed. The create is marked sent
//!   before it goes out ([`Restorer::sending`]): after a lost answer (a restart, a timeout, a
//!   5xx) the instance is looked for by name in `GET /v1/instances`; one found is deleted (its
//!   password is shown only in the lost answer), and once it is gone from the list the create is
//!   sent again, at most [`MAX_CREATES`] times. Into a **spare instance** (`drill_instance`) or a
//!   second database of the source (`drill_database`), as follows: the database is emptied
//!   (bounded `DETACH DELETE`s), the newest
//!   backup (or the one named) is loaded into it as above and cleaned up (so no node carries the
//!   import label when counted), nodes per label and relationships per type are counted in the
//!   database and compared with the counts the manifest recorded when the export was written
//!   (backups from before those were recorded: the counts the scan took from the file), so an
//!   export altered in R2, even with a consistent footer, fails naming the label; the database is
//!   emptied again and the import constraint dropped (both also when something failed) and the
//!   outcome is written next to the backup as `drill.json`. A difference fails the drill, naming
//!   the label or type.
//!
//! Anything that overwrites data needs `confirm`: the instance id for a snapshot restore, the
//! target database's name for a logical load.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{param_text, Answer, Io, IoDone, Next, RestoreCx, Restorer, DRILL_NAME};
use crate::error::StepError;
use crate::http::{status_error, HttpRequest, HttpResponse};
use crate::identity::{JobId, Task};
use crate::manifest::Manifest;
use crate::providers::aura::digest::ValueDigests;
use crate::providers::aura::drill::{self as drill, DrillTarget};
use crate::providers::aura::{self as provider, AuraConfig, GRAPH_FILE};
use crate::providers::{url_with_path, Credentials, ProviderConfig};
use crate::secret::Secret;
use crate::time::Timestamp;

/// Graph elements per chunk of the load, unless the request says `batch_size`.
pub const DEFAULT_BATCH: u32 = 500;
/// Statements one load step sends at most, unless the request says `step_statements`.
pub const DEFAULT_STEP_STATEMENTS: u32 = 40;
/// How long one load or scan step may run.
pub const STEP_TIME: Duration = Duration::from_secs(30);
/// Nodes one delete statement removes at most while a drill empties its database.
pub const DELETE_LIMIT: u32 = 5_000;
/// Token refetches allowed after a 401/403 before the job fails.
const MAX_AUTH_RETRIES: u32 = 2;
/// How long an instance may stay `restoring` before the job gives up watching.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// How long after the restore POST `running` is not yet taken as done while `restoring` was
/// never seen (Aura's status lags the POST), unless the request says `restoring_wait_seconds`.
pub const DEFAULT_RESTORING_WAIT_SECONDS: u32 = 600;
/// Scratch instance creates a drill sends at most (each after the last one's answer was lost and
/// the instance it may have made was deleted).
pub const MAX_CREATES: u32 = 3;

/// Counts a database's nodes.
pub const COUNT_NODES: &str = "MATCH (n) RETURN count(n) AS nodes";
/// Deletes up to `$limit` nodes with their relationships.
pub const DELETE_BATCH: &str = "MATCH (n) WITH n LIMIT $limit DETACH DELETE n RETURN count(n) AS deleted";
/// Nodes per label.
pub const LABEL_COUNTS: &str = "MATCH (n) UNWIND labels(n) AS label RETURN label, count(*) AS n";
/// Relationships per type.
pub const TYPE_COUNTS: &str = "MATCH ()-[r]->() RETURN type(r) AS type, count(r) AS n";
/// The label every node carries while it is loaded, so nodes are found by an indexed lookup (a
/// "unique import label", as APOC's Cypher export calls it) whatever their own labels.
pub const IMPORT_LABEL: &str = "_FerryImport";
/// Makes `_ferry_id` unique on the import label before anything is loaded; its index serves every
/// `MERGE` and endpoint `MATCH` of the load. `IF NOT EXISTS`: a step sent again changes nothing.
pub const CREATE_IMPORT_CONSTRAINT: &str =
    "CREATE CONSTRAINT `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) REQUIRE n.`_ferry_id` IS UNIQUE";
/// Drops that constraint (and its index) once the load is cleaned up.
pub const DROP_IMPORT_CONSTRAINT: &str = "DROP CONSTRAINT `ferry_import_id` IF EXISTS";
/// Takes the import label and the helper property off up to `$limit` loaded nodes (found by the
/// label's token index, not by reading every node).
pub const CLEANUP_NODES: &str = "MATCH (n:`_FerryImport`) WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` \
                                 RETURN count(n) AS cleaned";
/// Removes the helper property from up to `$limit` nodes: the cleanup of a load begun before
/// Ferry loaded through the import label (its cursor says so), which goes on as it began.
pub const LEGACY_CLEANUP_NODES: &str =
    "MATCH (n) WHERE n.`_ferry_id` IS NOT NULL WITH n LIMIT $limit REMOVE n.`_ferry_id` RETURN count(n) AS cleaned";
/// Removes the helper property the load keys relationships by, from up to `$limit` of them.
pub const CLEANUP_RELATIONSHIPS: &str = "MATCH ()-[r]->() WHERE r.`_ferry_id` IS NOT NULL WITH r LIMIT $limit REMOVE \
                                         r.`_ferry_id` RETURN count(r) AS cleaned";
/// Elements one cleanup statement handles at most.
pub const CLEANUP_LIMIT: u32 = 10_000;

/// The property a load keys its elements by, and the constraint that makes it unique under the
/// import label (and so indexed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helper {
    /// The helper property.
    pub property: String,
    /// The constraint's name.
    pub constraint: String,
}

impl Helper {
    /// `_ferry_id` and `ferry_import_id`: loads begun before helpers were per job, and
    /// `scripts/aura_restore.py` when its file has no such property.
    pub fn legacy() -> Self {
        Self { property: "_ferry_id".into(), constraint: "ferry_import_id".into() }
    }

    /// The helper of one job: a name no source graph has (the scan checks it).
    pub fn for_job(job: &JobId) -> Self {
        Self { property: format!("_ferry_{job}"), constraint: format!("ferry_import_{job}") }
    }

    /// Makes the helper unique on the import label before anything is loaded; its index serves
    /// every `MERGE` and endpoint `MATCH` of the load. `IF NOT EXISTS`: sent again, it changes
    /// nothing.
    pub fn create_constraint(&self) -> String {
        format!(
            "CREATE CONSTRAINT {} IF NOT EXISTS FOR (n:{}) REQUIRE n.{} IS UNIQUE",
            quote(&self.constraint),
            quote(IMPORT_LABEL),
            quote(&self.property)
        )
    }

    /// Drops that constraint (and its index) once the load is cleaned up.
    pub fn drop_constraint(&self) -> String {
        format!("DROP CONSTRAINT {} IF EXISTS", quote(&self.constraint))
    }

    /// Takes the import label and the helper off up to `$limit` loaded nodes (found by the
    /// label's token index, not by reading every node).
    pub fn cleanup_nodes(&self) -> String {
        let (import, helper) = (quote(IMPORT_LABEL), quote(&self.property));
        format!("MATCH (n:{import}) WITH n LIMIT $limit REMOVE n:{import}, n.{helper} RETURN count(n) AS cleaned")
    }

    /// Removes the helper from up to `$limit` relationships.
    pub fn cleanup_relationships(&self) -> String {
        let helper = quote(&self.property);
        format!(
            "MATCH ()-[r]->() WHERE r.{helper} IS NOT NULL WITH r LIMIT $limit REMOVE r.{helper} RETURN count(r) AS \
             cleaned"
        )
    }

    /// Makes nodes keyed by the helper (the export's element id) under the import label, then
    /// gives them their own labels (labels cannot be parameters): the `MERGE` is an index lookup
    /// on the import constraint and finds the node a statement sent before made, so sending it
    /// again (its answer was lost) changes nothing. `+=` keeps the helper, which `=` would drop.
    pub fn node_statement(&self, labels: &[String]) -> String {
        let labels: String = labels.iter().map(|l| format!(":{}", quote(l))).collect();
        let set_labels = if labels.is_empty() { String::new() } else { format!("n{labels}, ") };
        format!(
            "UNWIND $rows AS row MERGE (n:{} {{{}: row.id}}) SET {set_labels}n += row.props",
            quote(IMPORT_LABEL),
            quote(&self.property)
        )
    }

    /// Makes relationships of this type between nodes found by the helper under the import label
    /// (two index lookups), themselves keyed by the helper (the export's relationship id), so a
    /// statement sent twice makes each once.
    pub fn relationship_statement(&self, rel_type: &str) -> String {
        let (import, helper) = (quote(IMPORT_LABEL), quote(&self.property));
        format!(
            "UNWIND $rows AS row MATCH (a:{import} {{{helper}: row.start}}), (b:{import} {{{helper}: row.end}}) \
             MERGE (a)-[r:{} {{{helper}: row.id}}]->(b) SET r += row.props",
            quote(rel_type)
        )
    }
}

/// A Cypher name in backticks, backticks doubled.
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The node statement with the legacy helper `_ferry_id` ([`Helper::node_statement`]).
pub fn node_statement(labels: &[String]) -> String {
    Helper::legacy().node_statement(labels)
}

/// The relationship statement with the legacy helper ([`Helper::relationship_statement`]).
pub fn relationship_statement(rel_type: &str) -> String {
    Helper::legacy().relationship_statement(rel_type)
}

/// The node statement of a load begun before Ferry loaded through the import label: it goes on
/// with the statements it began with, so its relationships find every node it made.
pub fn legacy_node_statement(labels: &[String]) -> String {
    let labels: String = labels.iter().map(|l| format!(":{}", quote(l))).collect();
    format!("UNWIND $rows AS row MERGE (n{labels} {{`_ferry_id`: row.id}}) SET n += row.props")
}

/// The relationship statement of such a load (endpoints found by `_ferry_id` alone).
pub fn legacy_relationship_statement(rel_type: &str) -> String {
    format!(
        "UNWIND $rows AS row MATCH (a {{`_ferry_id`: row.start}}), (b {{`_ferry_id`: row.end}}) MERGE (a)-[r:{} {{`_ferry_id`: row.id}}]->(b) SET r += row.props",
        quote(rel_type)
    )
}

/// A Query API request.
pub fn query(url: &str, authorization: &Secret, statement: &str, parameters: Value) -> HttpRequest {
    HttpRequest::post_json(url.to_string(), &json!({ "statement": statement, "parameters": parameters }))
        .header("accept", "application/json")
        .header("authorization", authorization.expose().to_string())
}

/// The request that sends one statement of the load: typed JSON for a version 2 file's rows
/// (every parameter typed, `$rows` a typed List of typed Maps), plain JSON for a version 1 file.
pub fn load_request(url: &str, authorization: &Secret, group: &Group) -> HttpRequest {
    if group.typed {
        let rows = json!({ "$type": "List", "_value": group.rows });
        provider::typed_query(url, authorization.expose(), &group.statement, json!({ "rows": rows }))
    } else {
        query(url, authorization, &group.statement, json!({ "rows": group.rows }))
    }
}

fn typed_string(v: &Value) -> Value {
    json!({ "$type": "String", "_value": v })
}

fn typed_map(v: Value) -> Value {
    json!({ "$type": "Map", "_value": v })
}

// ----- the graph file: scan and load, pure ------------------------------------------------

/// Where a scan or load of `graph.jsonl.gz` stands; persisted with the job (and, during a
/// step, after every statement by the runtime).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadCursor {
    /// `false` while scanning, `true` while loading.
    pub loading: bool,
    /// Lines (1-based count) fully handled in this pass.
    pub lines_done: u64,
    /// Statements of the chunk after `lines_done` already sent.
    pub groups_done: u32,
    /// Scan: nodes per label.
    pub labels: BTreeMap<String, u64>,
    /// Scan: relationships per type.
    pub types: BTreeMap<String, u64>,
    /// Scan: nodes.
    pub nodes: u64,
    /// Scan: relationships.
    pub relationships: u64,
    /// Scan: a relationship line was seen (no node may follow).
    pub seen_relationship: bool,
    /// Scan: the footer was seen.
    pub footer: bool,
    /// Load: nodes sent.
    pub loaded_nodes: u64,
    /// Load: relationships sent.
    pub loaded_relationships: u64,
    /// Load: statements sent.
    pub statements: u64,
    /// Load: every line was sent.
    pub finished: bool,
    /// Where the next step starts reading: the compressed offset of a gzip member's start (the
    /// export is one member per export slice) before which every line is done.
    #[serde(default)]
    pub resume_offset: u64,
    /// Lines before `resume_offset`; the lines of that member done are `lines_done - resume_line`.
    #[serde(default)]
    pub resume_line: u64,
    /// The load keys nodes by `_ferry_id` under [`IMPORT_LABEL`] (set when the scan hands over).
    /// `false` on a load begun before Ferry did: it goes on with the statements it began with.
    #[serde(default)]
    pub import_label: bool,
    /// The file is version 2: properties in typed JSON, sent typed (set by the scan's header).
    #[serde(default)]
    pub typed: bool,
    /// Scan of a version 2 file: the digests of its typed values (what a drill compares the
    /// restored graph with when the manifest recorded none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<ValueDigests>,
}

impl LoadCursor {
    /// Whether `self` is further along than `other` (the same pass, more done).
    pub fn ahead_of(&self, other: &LoadCursor) -> bool {
        (self.loading, self.finished, self.lines_done, self.groups_done)
            > (other.loading, other.finished, other.lines_done, other.groups_done)
    }
}

/// One statement of a chunk: the rows of one label set or one relationship type.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The Cypher statement.
    pub statement: String,
    /// Its `$rows`.
    pub rows: Vec<Value>,
    /// Whether the rows are nodes.
    pub nodes: bool,
    /// Whether the rows are typed JSON (sent with `Content-Type: application/vnd.neo4j.query`).
    pub typed: bool,
}

enum Item {
    Node(Vec<String>, Value),
    Rel(String, Value),
    Other,
}

/// Reads the graph file's lines and cuts the load into statements; the runtime feeds it lines
/// and sends what it returns.
#[derive(Debug)]
pub struct GraphLoader {
    /// Where it stands.
    pub cursor: LoadCursor,
    batch: usize,
    line: u64,
    chunk: Vec<(Vec<String>, Option<String>, Value)>,
    /// Member boundaries seen (offset, lines before it) not yet behind `lines_done`: at most one
    /// per line of the current chunk.
    boundaries: Vec<(u64, u64)>,
    helper: Helper,
}

fn bad(line: u64, what: impl std::fmt::Display) -> StepError {
    StepError::permanent(format!("{GRAPH_FILE} line {line}: {what}; the backup cannot be loaded"))
}

fn parse(line: u64, text: &[u8]) -> Result<Option<Value>, StepError> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<Value>(text).map(Some).map_err(|e| bad(line, format!("not JSON ({e})")))
}

/// One line as a load row: plain JSON (version 1), or typed JSON whose ids are Strings and whose
/// properties are the file's typed values (version 2).
fn item(line: u64, v: &Value, typed: bool) -> Result<Item, StepError> {
    let id = |field: &str| -> Result<Value, StepError> {
        let value = v.get(field).filter(|i| !i.is_null()).cloned();
        match (value, typed) {
            (Some(id @ Value::String(_)), true) => Ok(typed_string(&id)),
            (Some(_), true) => Err(bad(line, format!("{field} is not text"))),
            (Some(id), false) => Ok(id),
            (None, _) if field == "id" => Err(bad(line, "an element without id")),
            (None, _) => Err(bad(line, format!("a relationship without {field}"))),
        }
    };
    let props = v.get("properties").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
    let row = |fields: Value| if typed { typed_map(fields) } else { fields };
    let props = if typed { typed_map(props) } else { props };
    match v.get("type").and_then(Value::as_str) {
        Some("node") => {
            let labels: Vec<String> = match v.get("labels") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|l| l.as_str().map(str::to_string).ok_or_else(|| bad(line, "a label that is not text")))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(bad(line, "labels is not a list")),
            };
            Ok(Item::Node(labels, row(json!({ "id": id("id")?, "props": props }))))
        }
        Some("relationship") => {
            let t = v
                .get("rel_type")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(line, "a relationship without rel_type"))?;
            let (start, end) = (id("start")?, id("end")?);
            Ok(Item::Rel(t.to_string(), row(json!({ "id": id("id")?, "start": start, "end": end, "props": props }))))
        }
        Some("header" | "footer") => Ok(Item::Other),
        other => Err(bad(line, format!("unknown line type {other:?}"))),
    }
}

impl GraphLoader {
    /// Goes on from `cursor`, with chunks of `batch` elements, keyed by the legacy helper.
    pub fn new(cursor: LoadCursor, batch: u32) -> Self {
        let line = cursor.resume_line;
        let helper = Helper::legacy();
        Self { cursor, batch: batch.max(1) as usize, line, chunk: Vec::new(), boundaries: Vec::new(), helper }
    }

    /// Keys the load by `helper` (the scan refuses a file that has a property of its name).
    pub fn with_helper(mut self, helper: Helper) -> Self {
        self.helper = helper;
        self
    }

    /// Where the runtime starts reading the file (a member's start, `0` at first): the loader
    /// counts lines from there.
    pub fn read_from(&self) -> u64 {
        self.cursor.resume_offset
    }

    /// A gzip member ended at compressed offset `offset`, after every line fed so far (no line
    /// runs on into the next member): a later step may start reading there once those lines are
    /// done.
    pub fn member_end(&mut self, offset: u64) {
        match self.boundaries.last_mut() {
            Some(last) if last.1 == self.line => *last = (offset, self.line),
            _ => self.boundaries.push((offset, self.line)),
        }
        self.promote();
    }

    /// Moves the resume point to the last boundary whose lines are all done.
    fn promote(&mut self) {
        let done = self.boundaries.iter().take_while(|(_, line)| *line <= self.cursor.lines_done).count();
        if let Some(&(offset, line)) = done.checked_sub(1).and_then(|i| self.boundaries.get(i)) {
            if line >= self.cursor.resume_line {
                self.cursor.resume_offset = offset;
                self.cursor.resume_line = line;
            }
        }
        self.boundaries.drain(..done);
    }

    /// Whether this pass has nothing more to do.
    pub fn done(&self) -> bool {
        self.cursor.finished
    }

    /// One line of the file (without its newline). While loading, a full chunk comes back as
    /// its statements: send those from `cursor.groups_done` on, calling [`Self::sent`] after
    /// each, then [`Self::chunk_done`].
    pub fn line(&mut self, text: &[u8]) -> Result<Option<Vec<Group>>, StepError> {
        self.line += 1;
        let n = self.line;
        if n <= self.cursor.lines_done {
            return Ok(None);
        }
        if !self.cursor.loading {
            self.scan(n, text)?;
            self.cursor.lines_done = n;
            self.promote();
            return Ok(None);
        }
        let Some(v) = parse(n, text)? else {
            self.chunk.push((Vec::new(), None, Value::Null));
            return Ok(self.full());
        };
        match item(n, &v, self.cursor.typed)? {
            Item::Node(labels, row) => self.chunk.push((labels, None, row)),
            Item::Rel(t, row) => self.chunk.push((Vec::new(), Some(t), row)),
            Item::Other => self.chunk.push((Vec::new(), None, Value::Null)),
        }
        Ok(self.full())
    }

    fn full(&self) -> Option<Vec<Group>> {
        let elements = self.chunk.iter().filter(|(_, _, row)| !row.is_null()).count();
        (elements >= self.batch).then(|| self.groups())
    }

    /// The chunk's statements: one per label set or type, in order of first appearance.
    fn groups(&self) -> Vec<Group> {
        let mut groups: Vec<(Option<&String>, &Vec<String>, Group)> = Vec::new();
        for (labels, t, row) in &self.chunk {
            if row.is_null() {
                continue;
            }
            match groups.iter_mut().find(|(gt, gl, _)| *gt == t.as_ref() && (t.is_some() || *gl == labels)) {
                Some((_, _, g)) => g.rows.push(row.clone()),
                None => {
                    let statement = match (t, self.cursor.import_label) {
                        (Some(t), true) => self.helper.relationship_statement(t),
                        (None, true) => self.helper.node_statement(labels),
                        (Some(t), false) => legacy_relationship_statement(t),
                        (None, false) => legacy_node_statement(labels),
                    };
                    let group =
                        Group { statement, rows: vec![row.clone()], nodes: t.is_none(), typed: self.cursor.typed };
                    groups.push((t.as_ref(), labels, group));
                }
            }
        }
        groups.into_iter().map(|(_, _, g)| g).collect()
    }

    /// One statement of the current chunk was sent.
    pub fn sent(&mut self) {
        self.cursor.groups_done += 1;
        self.cursor.statements += 1;
    }

    /// Every statement of the current chunk was sent.
    pub fn chunk_done(&mut self, groups: &[Group]) {
        for g in groups {
            if g.nodes {
                self.cursor.loaded_nodes += g.rows.len() as u64;
            } else {
                self.cursor.loaded_relationships += g.rows.len() as u64;
            }
        }
        self.cursor.lines_done = self.line;
        self.cursor.groups_done = 0;
        self.chunk.clear();
        self.promote();
    }

    /// The file ended. A scan checks the footer and hands over to the load (the next step reads
    /// the file again); a load returns its last chunk's statements, if any.
    pub fn end(&mut self) -> Result<Option<Vec<Group>>, StepError> {
        if !self.cursor.loading {
            if !self.cursor.footer {
                return Err(StepError::permanent(format!(
                    "{GRAPH_FILE} has no footer line after line {}: the export is incomplete, refusing to load it",
                    self.cursor.lines_done
                )));
            }
            self.cursor.loading = true;
            self.cursor.import_label = true;
            self.cursor.lines_done = 0;
            self.cursor.groups_done = 0;
            self.cursor.resume_offset = 0;
            self.cursor.resume_line = 0;
            self.boundaries.clear();
            return Ok(None);
        }
        if self.chunk.iter().any(|(_, _, row)| !row.is_null()) {
            return Ok(Some(self.groups()));
        }
        self.cursor.lines_done = self.line;
        self.chunk.clear();
        self.cursor.finished = true;
        Ok(None)
    }

    /// After `end` returned the last chunk and it was sent.
    pub fn last_chunk_done(&mut self, groups: &[Group]) {
        self.chunk_done(groups);
        self.cursor.finished = true;
    }

    fn scan(&mut self, n: u64, text: &[u8]) -> Result<(), StepError> {
        let Some(v) = parse(n, text)? else { return Ok(()) };
        let c = &mut self.cursor;
        if c.footer {
            return Err(bad(n, "a line after the footer"));
        }
        let kind = v.get("type").and_then(Value::as_str);
        if n == 1 {
            if kind != Some("header") || v.get("format").and_then(Value::as_str) != Some("ferry-neo4j-jsonl") {
                return Err(bad(n, "no ferry-neo4j-jsonl header"));
            }
            c.typed = match v.get("version").and_then(Value::as_u64).unwrap_or(1) {
                1 => false,
                2 if v.get("values").and_then(Value::as_str) == Some("typed-json") => true,
                version => return Err(bad(n, format!("format version {version}, which this Ferry does not know"))),
            };
            c.values = c.typed.then(ValueDigests::default);
            return Ok(());
        }
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            if props.contains_key(&self.helper.property) {
                return Err(bad(
                    n,
                    format!(
                        "a property named {:?}, the helper property this load keys elements by",
                        self.helper.property
                    ),
                ));
            }
            if c.typed && props.values().any(|p| p.get("$type").and_then(Value::as_str).is_none()) {
                return Err(bad(n, "a property that is not typed JSON ({\"$type\", \"_value\"}) in a version 2 file"));
            }
        }
        let props = v.get("properties").and_then(Value::as_object);
        match item(n, &v, c.typed)? {
            Item::Node(labels, _) => {
                if let Some(values) = c.values.as_mut() {
                    values.add_node(&labels, props.unwrap_or(&serde_json::Map::new()));
                }
                if c.seen_relationship {
                    return Err(bad(n, "a node after the relationships"));
                }
                if labels.iter().any(|l| l == IMPORT_LABEL) {
                    return Err(bad(n, format!("a node labelled {IMPORT_LABEL}, the label Ferry loads through")));
                }
                c.nodes += 1;
                for l in labels {
                    *c.labels.entry(l).or_default() += 1;
                }
            }
            Item::Rel(t, _) => {
                if let Some(values) = c.values.as_mut() {
                    values.add_relationship(&t, props.unwrap_or(&serde_json::Map::new()));
                }
                c.seen_relationship = true;
                c.relationships += 1;
                *c.types.entry(t).or_default() += 1;
            }
            Item::Other if kind == Some("footer") => {
                let nodes = v.get("nodes").and_then(Value::as_u64);
                let rels = v.get("relationships").and_then(Value::as_u64);
                if nodes != Some(c.nodes) || rels != Some(c.relationships) {
                    return Err(bad(
                        n,
                        format!(
                            "the footer lists {} nodes and {} relationships, the file holds {} and {}",
                            nodes.map_or("no".into(), |x| x.to_string()),
                            rels.map_or("no".into(), |x| x.to_string()),
                            c.nodes,
                            c.relationships
                        ),
                    ));
                }
                c.footer = true;
            }
            Item::Other => return Err(bad(n, "a second header")),
        }
        Ok(())
    }
}

/// What [`MemberLines::next_piece`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// One line, without its newline.
    Line(Vec<u8>),
    /// A gzip member ended at this compressed offset (absolute in the file) and no line runs on
    /// into the next member: reading may start there. Not reported for the file's last member.
    MemberEnd(u64),
    /// Feed the next compressed bytes (or say the input ended).
    NeedInput,
    /// The input ended and every line was returned.
    Done,
}

/// Decodes a concatenation of gzip members, one member at a time, into lines, knowing the
/// compressed offset where each member ends, so a later read can start at a member's start (an
/// R2 ranged read) instead of inflating the file from its beginning. Memory: the compressed
/// chunk fed, one decoder's output (at most its 32 KiB buffer per write) and one line.
pub struct MemberLines {
    decoder: flate2::write::GzDecoder<Vec<u8>>,
    /// Compressed offset of the current member's start.
    member_start: u64,
    /// Compressed bytes of the current member the decoder took.
    consumed: u64,
    input: Vec<u8>,
    input_pos: usize,
    input_ended: bool,
    finished: bool,
    out: Vec<u8>,
    out_pos: usize,
    line: Vec<u8>,
    pending_end: Option<u64>,
    max_line: usize,
}

impl MemberLines {
    /// Reads from compressed offset `start` (a member's start), lines up to `max_line` bytes.
    pub fn new(start: u64, max_line: usize) -> Self {
        Self {
            decoder: flate2::write::GzDecoder::new(Vec::new()),
            member_start: start,
            consumed: 0,
            input: Vec::new(),
            input_pos: 0,
            input_ended: false,
            finished: false,
            out: Vec::new(),
            out_pos: 0,
            line: Vec::new(),
            pending_end: None,
            max_line,
        }
    }

    /// The next compressed bytes, after [`Piece::NeedInput`].
    pub fn feed(&mut self, chunk: Vec<u8>) {
        self.input = chunk;
        self.input_pos = 0;
    }

    /// The compressed input ended, after [`Piece::NeedInput`].
    pub fn end_input(&mut self) {
        self.input_ended = true;
    }

    fn corrupt(e: std::io::Error) -> StepError {
        StepError::permanent(format!("{GRAPH_FILE} is not valid gzip ({e}); the backup cannot be loaded"))
    }

    /// The next line or member boundary, or what it needs.
    pub fn next_piece(&mut self) -> Result<Piece, StepError> {
        loop {
            let rest = &self.out[self.out_pos..];
            if let Some(i) = rest.iter().position(|b| *b == b'\n') {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..i]);
                self.out_pos += i + 1;
                return Ok(Piece::Line(line));
            }
            self.line.extend_from_slice(rest);
            self.out.clear();
            self.out_pos = 0;
            if self.line.len() > self.max_line {
                return Err(StepError::permanent(format!(
                    "{GRAPH_FILE} has a line over {} MiB; the backup cannot be loaded",
                    self.max_line >> 20
                )));
            }
            if let Some(offset) = self.pending_end.take() {
                if self.line.is_empty() {
                    return Ok(Piece::MemberEnd(offset));
                }
                continue;
            }
            if self.input_pos < self.input.len() {
                let n =
                    std::io::Write::write(&mut self.decoder, &self.input[self.input_pos..]).map_err(Self::corrupt)?;
                if n == 0 {
                    // The member is complete (trailer included): check it, take its last output.
                    self.decoder.try_finish().map_err(Self::corrupt)?;
                    self.out = std::mem::take(self.decoder.get_mut());
                    self.member_start += self.consumed;
                    self.consumed = 0;
                    self.pending_end = Some(self.member_start);
                    self.decoder = flate2::write::GzDecoder::new(Vec::new());
                } else {
                    self.input_pos += n;
                    self.consumed += n as u64;
                    self.out = std::mem::take(self.decoder.get_mut());
                }
                continue;
            }
            if !self.input_ended {
                self.input = Vec::new();
                self.input_pos = 0;
                return Ok(Piece::NeedInput);
            }
            if !self.finished {
                self.finished = true;
                if self.consumed > 0 {
                    self.decoder.try_finish().map_err(Self::corrupt)?;
                    self.out = std::mem::take(self.decoder.get_mut());
                }
                continue;
            }
            if !self.line.is_empty() {
                return Ok(Piece::Line(std::mem::take(&mut self.line)));
            }
            return Ok(Piece::Done);
        }
    }
}

/// What the runtime does for one step of a scan or load.
#[derive(Clone, PartialEq)]
pub struct GraphLoadOrder {
    /// The graph file's R2 key.
    pub key: String,
    /// The target database's Query API URL.
    pub url: String,
    /// Its `Authorization` header.
    pub authorization: Secret,
    /// Elements per chunk.
    pub batch: u32,
    /// Statements this step sends at most.
    pub max_statements: u32,
    /// How long this step may run.
    pub max_time: Duration,
    /// Where the runtime keeps the cursor between statements (Durable Object storage).
    pub record_key: String,
    /// Where the pass stands.
    pub cursor: LoadCursor,
    /// The property the load keys elements by.
    pub helper: Helper,
    /// An encrypted graph file: the size of the age file and the identity it is read with
    /// (never persisted).
    pub sealed: Option<(u64, Secret)>,
}

impl std::fmt::Debug for GraphLoadOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphLoadOrder")
            .field("key", &self.key)
            .field("url", &self.url)
            .field("batch", &self.batch)
            .field("cursor", &self.cursor)
            .field("helper", &self.helper)
            .finish_non_exhaustive()
    }
}

// ----- the restore machine ----------------------------------------------------------------

/// What a restore job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Restore the instance to the backup's snapshot.
    Snapshot,
    /// Load the logical export into an empty database.
    Logical,
    /// Load into the drill database, compare counts, empty it.
    Drill,
}

/// Where a restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Read the backup's manifest.
    ReadManifest,
    /// Ask Aura to restore the snapshot.
    SnapshotRestore,
    /// The restore POST went unanswered: read the instance before sending it again.
    CheckInstance,
    /// Poll the instance until it is no longer `restoring`.
    PollInstance,
    /// Scratch drills: read the source instance's details (what the scratch instance copies).
    ReadSourceInstance,
    /// Scratch drills: create the scratch instance.
    CreateInstance,
    /// Scratch drills: the create went out; its answer comes here. Woken here (the answer was
    /// lost to a restart), the instance is looked for by name first.
    CreateSent,
    /// Scratch drills: look for instances of the scratch name (after a lost create answer, or to
    /// clean up after a failure).
    FindScratch,
    /// Scratch drills: delete an instance found by name (its password is unknown).
    DeleteOrphan,
    /// Scratch drills: wait until no instance of the scratch name is listed, then create.
    WaitOrphanGone,
    /// Scratch drills: poll the scratch instance until it is `running`.
    WaitRunning,
    /// Scratch drills: delete the scratch instance (also after a failure).
    DeleteScratch,
    /// Count the target's nodes (it must be empty).
    CountTarget,
    /// Drills: delete the drill database's nodes, a batch at a time.
    EmptyBefore,
    /// Make `_ferry_id` unique on the import label (the index every load statement looks up).
    CreateConstraint,
    /// Scan or load the graph file (`Io::GraphLoad` steps).
    Load,
    /// Remove the import label and `_ferry_id` from nodes, a batch at a time.
    Cleanup,
    /// Remove `_ferry_id` from relationships, a batch at a time.
    CleanupRelationships,
    /// Drills: nodes per label.
    CountLabels,
    /// Drills: relationships per type.
    CountTypes,
    /// Drills of typed backups: read the nodes back page by page in typed JSON, folding their
    /// values into digests.
    ReadNodes,
    /// Drills of typed backups: the same for relationships, then compare the digests.
    ReadRelationships,
    /// Drills: empty the drill database again.
    EmptyAfter,
    /// Drop the import constraint: after the cleanup (logical loads), after emptying (drills,
    /// also when they failed).
    DropConstraint,
    /// Drills: write the record.
    Record,
    /// Nothing more to do.
    Done,
}

/// The backup, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRef {
    /// The backup's folder, with trailing slash.
    pub folder: String,
    /// The snapshot's id, when the backup took one.
    pub snapshot_id: Option<String>,
    /// The graph file's key, when the backup has one.
    pub graph_key: Option<String>,
    /// Nodes per label the export wrote, as its manifest recorded them (older backups: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, u64>>,
    /// Relationships per type the export wrote, as its manifest recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<BTreeMap<String, u64>>,
    /// The digests of the typed values the export wrote, as its manifest recorded them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<ValueDigests>,
    /// An encrypted graph file (`graph.jsonl.gz.age`): the size of the age file R2 holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_sealed: Option<u64>,
}

/// A restore's persisted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuraRestore {
    /// What it does.
    pub mode: Mode,
    /// The source's instance.
    pub instance_id: String,
    /// The backup's manifest key; the newest backup when `None` (drills).
    pub manifest_key: Option<String>,
    /// The database loaded into (logical: the target; drills: `drill_database`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Elements per load chunk.
    pub batch_size: u32,
    /// Statements per load step.
    pub step_statements: u32,
    /// Where it stands.
    pub step: Step,
    /// The backup, once the manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupRef>,
    /// The cached Aura API token (never shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_token: Option<String>,
    /// When it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Timestamp>,
    /// Consecutive 401/403 answers.
    #[serde(default)]
    pub auth_retries: u32,
    /// When Aura accepted the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_started_at: Option<Timestamp>,
    /// The instance's latest status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_status: Option<String>,
    /// Instance polls answered.
    #[serde(default)]
    pub polls: u32,
    /// The scan and load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadCursor>,
    /// Drills: nodes deleted from the drill database.
    #[serde(default)]
    pub deleted: u64,
    /// Drills: nodes per label counted in the database.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted_labels: BTreeMap<String, u64>,
    /// Drills: relationships per type counted in the database.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted_types: BTreeMap<String, u64>,
    /// Why the drill failed; the database is emptied and the record written first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Notes for the reader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Snapshot restores: the instance was seen `restoring` after the POST.
    #[serde(default)]
    pub seen_restoring: bool,
    /// Snapshot restores: how long `running` without `restoring` is waited out after the POST.
    #[serde(default = "default_restoring_wait")]
    pub restoring_wait_seconds: u32,
    /// Drills: where the backup is loaded (absent: a drill begun before there was a choice, into
    /// `drill_database`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_target: Option<DrillTarget>,
    /// Drills into a scratch instance: its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<Box<Scratch>>,
    /// The load keys elements by a helper named after its job ([`Helper::for_job`]); `false` in a
    /// restore planned before, which goes on with `_ferry_id`.
    #[serde(default)]
    pub job_helper: bool,
    /// Drills of typed backups: the restored graph read back, as digests of its typed values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_values: Option<ValueDigests>,
    /// Drills reading back: the highest id of the phase, once asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_max: Option<u64>,
    /// Drills reading back: the first id of the next page.
    #[serde(default)]
    pub read_next: u64,
    /// Drills of typed backups: the restored graph's values were read back and compared.
    #[serde(default)]
    pub values_compared: bool,
}

fn default_restoring_wait() -> u32 {
    DEFAULT_RESTORING_WAIT_SECONDS
}

/// A drill's scratch instance, from its create to its delete.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scratch {
    /// `ferry-drill-<job id>` (set when the first request goes out).
    #[serde(default)]
    pub name: String,
    /// The create body, from the settings and the source instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_body: Option<Value>,
    /// Creates sent.
    #[serde(default)]
    pub creates: u32,
    /// The instance, once the create answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its Query API (from `connection_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_api_base: Option<String>,
    /// Its database user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `drill_scratch` as the job started with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Box<drill::ScratchSettings>>,
    /// Its generated password (never shown; blanked when the job ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_password: Option<String>,
    /// When the create answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    /// Instances of the scratch name found after a lost create answer, still to delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<String>,
    /// Instances deleted (the DELETE accepted, or already gone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    /// When the first delete (or wait for one) of the current instance began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleting_since: Option<Timestamp>,
}

fn count_param(params: &Value, name: &str, default: u32, max: u32) -> Result<u32, String> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u64::from(max)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| format!("\"{name}\" must be a whole number from 1 to {max}")),
    }
}

/// Checks a restore or drill request and makes the restore's state: `Err` is the 400 the caller
/// gets (nothing was touched). `backup` is the manifest key the route named (drills: optional).
pub fn plan(task: Task, cfg: &AuraConfig, params: &Value, backup: Option<String>) -> Result<AuraRestore, String> {
    if cfg.whole_tenant() {
        return Err("a whole-tenant source has no instance or Query API of its own to restore or drill into: load \
                    the backup's graph.jsonl.gz with scripts/aura_restore.py, or restore its snapshot in the Aura \
                    console (the manifest names the instance and the snapshot)"
            .into());
    }
    let target = param_text(params, "/target/database");
    if params.get("target").is_some() && target.is_none() {
        return Err("\"target\" must be {\"database\": \"<name of the database to load into>\"}".into());
    }
    let mut state = AuraRestore {
        mode: Mode::Snapshot,
        instance_id: cfg.instance_id.clone(),
        manifest_key: backup,
        database: None,
        batch_size: count_param(params, "batch_size", DEFAULT_BATCH, 50_000)?,
        step_statements: count_param(params, "step_statements", DEFAULT_STEP_STATEMENTS, 10_000)?,
        step: Step::ReadManifest,
        backup: None,
        secret_access_token: None,
        token_expires_at: None,
        auth_retries: 0,
        restore_started_at: None,
        instance_status: None,
        polls: 0,
        load: None,
        deleted: 0,
        counted_labels: BTreeMap::new(),
        counted_types: BTreeMap::new(),
        failure: None,
        notes: Vec::new(),
        seen_restoring: false,
        restoring_wait_seconds: count_param(params, "restoring_wait_seconds", DEFAULT_RESTORING_WAIT_SECONDS, 86_400)?,
        drill_target: None,
        scratch: None,
        job_helper: true,
        restored_values: None,
        read_max: None,
        read_next: 0,
        values_compared: false,
    };
    let needs_password = || {
        cfg.db_password_secret
            .is_none()
            .then(|| "db_password_secret is required to load a logical export through the Query API".to_string())
    };
    match task {
        Task::Drill => {
            if target.is_some() {
                return Err("a drill loads into the source's drill_database; it takes no \"target\"".into());
            }
            let target = drill::drill_target(cfg)?;
            state.database = Some(match &target {
                DrillTarget::Scratch => {
                    state.scratch =
                        Some(Box::new(Scratch { settings: cfg.drill_scratch.clone(), ..Scratch::default() }));
                    drill::SCRATCH_DATABASE.to_string()
                }
                DrillTarget::Spare { .. } => {
                    cfg.drill_database.clone().unwrap_or_else(|| drill::SCRATCH_DATABASE.to_string())
                }
                DrillTarget::Database => {
                    if let Some(e) = needs_password() {
                        return Err(e);
                    }
                    cfg.drill_database.clone().unwrap_or_default()
                }
            });
            state.mode = Mode::Drill;
            state.drill_target = Some(target);
            Ok(state)
        }
        Task::Restore => {
            if state.manifest_key.is_none() {
                return Err("a restore needs the backup to restore (POST /v1/backups/{source}/{folder}/restore)".into());
            }
            match params.get("mode").and_then(Value::as_str) {
                Some("snapshot") => {
                    if target.is_some() {
                        return Err(
                            "a snapshot restore goes back into the source instance; it takes no \"target\"".into()
                        );
                    }
                    super::confirmed(params, &cfg.instance_id, &format!("Aura instance {}", cfg.instance_id))?;
                    Ok(state)
                }
                Some("logical") => {
                    let Some(target) = target else {
                        return Err("a logical load needs \"target\": {\"database\": \"<name>\"}, an empty database \
                                    on the source's Query API"
                            .into());
                    };
                    super::confirmed(params, &target, &format!("database {target}"))?;
                    if let Some(e) = needs_password() {
                        return Err(e);
                    }
                    state.mode = Mode::Logical;
                    state.database = Some(target);
                    Ok(state)
                }
                Some(other) => Err(format!("unknown \"mode\" {other:?}: use \"snapshot\" or \"logical\"")),
                None => Err("an Aura restore needs \"mode\": \"snapshot\" (the instance goes back to the backup's \
                             snapshot) or \"logical\" (the graph export is loaded into an empty database)"
                    .into()),
            }
        }
        Task::Export | Task::Verify | Task::Replicate => Err("not a restore".into()),
    }
}

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("Aura API: received a malformed response ({what})"))
}

fn instance_url(cfg: &AuraConfig, tail: &[&str]) -> Result<String, StepError> {
    let mut segments = vec!["v1", "instances", cfg.instance_id.as_str()];
    segments.extend_from_slice(tail);
    Ok(url_with_path(cfg.api_base()?, &segments))
}

impl AuraRestore {
    fn backup(&self) -> Result<&BackupRef, StepError> {
        self.backup.as_ref().ok_or_else(|| StepError::permanent("the backup's manifest was not read"))
    }

    fn endpoint(&self, cfg: &AuraConfig, creds: &Credentials) -> Result<(String, Secret), StepError> {
        let db = self.database.as_deref().ok_or_else(|| StepError::permanent("no target database"))?;
        let at = |base: &str, user: &str, password: &str| -> Result<(String, Secret), StepError> {
            let base = url::Url::parse(base)
                .map_err(|e| StepError::permanent(format!("the drill's Query API {base:?} is not a URL ({e})")))?;
            let pair = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{password}"));
            Ok((url_with_path(&base, &["db", db, "query", "v2"]), Secret::new(format!("Basic {pair}"))))
        };
        match &self.drill_target {
            Some(DrillTarget::Scratch) => {
                let s = self.scratch.as_ref().ok_or_else(|| StepError::permanent("no scratch instance"))?;
                let (Some(base), Some(user), Some(password)) = (&s.query_api_base, &s.username, &s.secret_password)
                else {
                    return Err(StepError::permanent("the scratch instance's Query API is not known"));
                };
                return at(base, user, password);
            }
            Some(DrillTarget::Spare { .. }) => {
                let base = cfg
                    .drill_query_api_base
                    .as_ref()
                    .ok_or_else(|| StepError::permanent("Aura: no drill_query_api_base configured"))?;
                let secret = cfg
                    .drill_password_secret
                    .as_deref()
                    .ok_or_else(|| StepError::permanent("drill_password_secret is required with drill_instance"))?;
                let user = cfg.drill_db_user.as_deref().unwrap_or("neo4j");
                return at(base.as_str(), user, creds.get(secret)?.expose());
            }
            Some(DrillTarget::Database) | None => {}
        }
        let secret = cfg
            .db_password_secret
            .as_deref()
            .ok_or_else(|| StepError::permanent("db_password_secret is required to load a logical export"))?;
        let (url, auth) = provider::query_endpoint(cfg, creds, db, secret)?;
        Ok((url, Secret::new(auth)))
    }

    fn is_api_step(&self) -> bool {
        matches!(
            self.step,
            Step::SnapshotRestore
                | Step::CheckInstance
                | Step::PollInstance
                | Step::ReadSourceInstance
                | Step::CreateInstance
                | Step::CreateSent
                | Step::FindScratch
                | Step::DeleteOrphan
                | Step::WaitOrphanGone
                | Step::WaitRunning
                | Step::DeleteScratch
        )
    }

    fn scratch_settings(&self) -> Result<drill::ScratchSettings, StepError> {
        self.scratch()?.settings.as_deref().cloned().ok_or_else(|| StepError::permanent("no drill_scratch settings"))
    }

    fn scratch(&self) -> Result<&Scratch, StepError> {
        self.scratch.as_deref().ok_or_else(|| StepError::permanent("no scratch instance"))
    }

    fn scratch_mut(&mut self) -> Result<&mut Scratch, StepError> {
        self.scratch.as_deref_mut().ok_or_else(|| StepError::permanent("no scratch instance"))
    }

    /// The property this restore's load keys elements by: the job's own, or `_ferry_id` for a
    /// restore planned before (or a load begun before the import label, keyed by `_ferry_id`).
    pub fn helper(&self, job: &JobId) -> Helper {
        let legacy_load = self.load.as_ref().is_some_and(|c| c.loading && !c.import_label);
        if self.job_helper && !legacy_load {
            Helper::for_job(job)
        } else {
            Helper::legacy()
        }
    }

    fn bearer(&self, req: HttpRequest) -> HttpRequest {
        let token = self.secret_access_token.as_deref().unwrap_or_default();
        req.header("authorization", format!("Bearer {token}")).header("content-type", "application/json")
    }

    fn next_with(
        &self,
        cfg: &AuraConfig,
        creds: &Credentials,
        identity: Option<&Secret>,
        job: &JobId,
        now: Timestamp,
    ) -> Result<Next, StepError> {
        if self.is_api_step() && self.secret_access_token.is_none() {
            return Ok(Next::Send(provider::token_request(cfg, creds)?));
        }
        let sid =
            || self.backup().and_then(|b| b.snapshot_id.clone().ok_or_else(|| StepError::permanent("no snapshot")));
        Ok(match self.step {
            Step::ReadManifest => Next::Io(Io::ReadManifest { key: self.manifest_key.clone() }),
            Step::SnapshotRestore => Next::Send(self.bearer(HttpRequest {
                method: crate::http::Method::Post,
                url: instance_url(cfg, &["snapshots", &sid()?, "restore"])?,
                headers: Vec::new(),
                body: None,
            })),
            Step::CheckInstance | Step::PollInstance | Step::ReadSourceInstance => {
                Next::Send(self.bearer(HttpRequest::get(instance_url(cfg, &[])?)))
            }
            Step::CreateInstance => {
                let s = self.scratch()?;
                if s.creates >= MAX_CREATES {
                    return Err(StepError::permanent(format!(
                        "the drill's scratch instance was created {MAX_CREATES} times without an answer; giving up"
                    )));
                }
                let body = s.create_body.as_ref().ok_or_else(|| StepError::permanent("no create body"))?;
                Next::Send(
                    self.bearer(HttpRequest::post_json(url_with_path(cfg.api_base()?, &["v1", "instances"]), body)),
                )
            }
            Step::CreateSent | Step::FindScratch | Step::WaitOrphanGone => {
                Next::Send(self.bearer(HttpRequest::get(url_with_path(cfg.api_base()?, &["v1", "instances"]))))
            }
            Step::DeleteOrphan | Step::WaitRunning | Step::DeleteScratch => {
                let s = self.scratch()?;
                let id = match self.step {
                    Step::DeleteOrphan => s.orphans.first(),
                    _ => s.id.as_ref(),
                }
                .ok_or_else(|| StepError::permanent("no scratch instance id"))?;
                let url = url_with_path(cfg.api_base()?, &["v1", "instances", id]);
                let method =
                    if self.step == Step::WaitRunning { crate::http::Method::Get } else { crate::http::Method::Delete };
                Next::Send(self.bearer(HttpRequest { method, url, headers: Vec::new(), body: None }))
            }
            Step::CountTarget => {
                let (url, auth) = self.endpoint(cfg, creds)?;
                Next::Send(query(&url, &auth, COUNT_NODES, json!({})))
            }
            Step::EmptyBefore | Step::EmptyAfter => {
                let (url, auth) = self.endpoint(cfg, creds)?;
                Next::Send(query(&url, &auth, DELETE_BATCH, json!({ "limit": DELETE_LIMIT })))
            }
            Step::CreateConstraint | Step::DropConstraint => {
                let (url, auth) = self.endpoint(cfg, creds)?;
                let helper = self.helper(job);
                let statement = if self.step == Step::CreateConstraint {
                    helper.create_constraint()
                } else {
                    helper.drop_constraint()
                };
                Next::Send(query(&url, &auth, &statement, json!({})))
            }
            Step::Cleanup | Step::CleanupRelationships => {
                let (url, auth) = self.endpoint(cfg, creds)?;
                let legacy = self.load.as_ref().is_some_and(|c| !c.import_label);
                let helper = self.helper(job);
                let statement = match (self.step, legacy) {
                    (Step::Cleanup, false) => helper.cleanup_nodes(),
                    (Step::Cleanup, true) => LEGACY_CLEANUP_NODES.to_string(),
                    _ => helper.cleanup_relationships(),
                };
                Next::Send(query(&url, &auth, &statement, json!({ "limit": CLEANUP_LIMIT })))
            }
            Step::CountLabels => {
                let (url, auth) = self.endpoint(cfg, creds)?;
                Next::Send(query(&url, &auth, LABEL_COUNTS, json!({})))
            }
            Step::CountTypes => {
                let (url, auth) = self.endpoint(cfg, creds)?;
                Next::Send(query(&url, &auth, TYPE_COUNTS, json!({})))
            }
            Step::ReadNodes | Step::ReadRelationships => {
                // The export's own statements (id seeks, typed JSON), a page of `batch_size` ids.
                let (url, auth) = self.endpoint(cfg, creds)?;
                let nodes = self.step == Step::ReadNodes;
                let (statement, parameters) = match self.read_max {
                    None => (if nodes { provider::MAX_NODE_ID } else { provider::MAX_RELATIONSHIP_ID }, json!({})),
                    Some(max) => {
                        let to = self.read_next.saturating_add(u64::from(self.batch_size.max(1)) - 1).min(max);
                        let page = if nodes { provider::NODES_QUERY } else { provider::RELATIONSHIPS_QUERY };
                        (
                            page,
                            json!({ "from": provider::typed_integer(self.read_next), "to": provider::typed_integer(to) }),
                        )
                    }
                };
                Next::Send(provider::typed_query(&url, auth.expose(), statement, parameters))
            }
            Step::Load => {
                let (url, authorization) = self.endpoint(cfg, creds)?;
                let key = self
                    .backup()?
                    .graph_key
                    .clone()
                    .ok_or_else(|| StepError::permanent("the backup holds no graph export"))?;
                Next::Io(Io::GraphLoad(Box::new(GraphLoadOrder {
                    key,
                    url,
                    authorization,
                    batch: self.batch_size,
                    max_statements: self.step_statements,
                    max_time: STEP_TIME,
                    record_key: format!("graphload:{job}"),
                    cursor: self.load.clone().unwrap_or_default(),
                    helper: self.helper(job),
                    sealed: match (self.backup()?.graph_sealed, identity) {
                        (Some(size), Some(identity)) => Some((size, identity.clone())),
                        (Some(_), None) => {
                            return Err(StepError::permanent(
                                "the graph export is encrypted and the source names no age_identity_secret",
                            ))
                        }
                        (None, _) => None,
                    },
                })))
            }
            Step::Record => Next::Io(Io::Record {
                key: format!("{}{DRILL_NAME}", self.backup()?.folder),
                record: self.drill_record(job, now),
            }),
            Step::Done => Next::Finished(match &self.failure {
                Some(f) => Err(f.clone()),
                None => Ok(self.summary(cfg)),
            }),
        })
    }

    fn summary(&self, cfg: &AuraConfig) -> String {
        let folder = self.backup.as_ref().map_or("?", |b| b.folder.as_str());
        let db = self.where_loaded();
        let db = db.as_str();
        let load = self.load.clone().unwrap_or_default();
        let mut note = self.notes.join("; ");
        if !note.is_empty() {
            note = format!(" ({note})");
        }
        let summary = match self.mode {
            Mode::Snapshot => format!(
                "restored instance {} to snapshot {} (backup {folder})",
                cfg.instance_id,
                self.backup.as_ref().and_then(|b| b.snapshot_id.as_deref()).unwrap_or("?")
            ),
            Mode::Logical => format!(
                "loaded backup {folder} into database {db}: {} nodes, {} relationships in {} statements",
                load.loaded_nodes, load.loaded_relationships, load.statements
            ),
            Mode::Drill => format!(
                "drill of backup {folder} passed: {} nodes, {} relationships loaded into {db} and counted{}",
                load.loaded_nodes,
                load.loaded_relationships,
                if self.values_compared { ", every value compared type for type" } else { "" }
            ),
        };
        if self.mode == Mode::Logical {
            summary
        } else {
            format!("{summary}{note}")
        }
    }

    /// Where a drill or load went, for its note and record.
    fn where_loaded(&self) -> String {
        let db = self.database.as_deref().unwrap_or("?");
        match (&self.drill_target, &self.scratch) {
            (Some(DrillTarget::Scratch), Some(s)) => format!(
                "database {db} of the scratch instance {} ({}, {})",
                s.id.as_deref().unwrap_or("?"),
                s.name,
                if s.id.as_ref().is_some_and(|id| s.deleted.contains(id)) { "deleted" } else { "not deleted" }
            ),
            (Some(DrillTarget::Spare { instance_id }), _) => {
                format!("database {db} of the spare instance {instance_id}")
            }
            _ => db.to_string(),
        }
    }

    /// What the drill compares the database with: the counts the manifest recorded when the
    /// export was written, or (older backups without them) the counts the scan read from the file.
    fn expected(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>, &'static str) {
        let load = self.load.clone().unwrap_or_default();
        match self.backup.as_ref().map(|b| (&b.labels, &b.types)) {
            Some((Some(labels), Some(types))) => (labels.clone(), types.clone(), "manifest"),
            _ => (load.labels, load.types, "file"),
        }
    }

    /// What a drill writes next to the backup.
    pub fn drill_record(&self, job: &JobId, now: Timestamp) -> Value {
        let load = self.load.clone().unwrap_or_default();
        let (labels, types, counts_from) = self.expected();
        let side = |expected: &BTreeMap<String, u64>, counted: &BTreeMap<String, u64>| -> BTreeMap<String, Value> {
            expected
                .keys()
                .chain(counted.keys())
                .map(|k| (k.clone(), json!({ "backup": expected.get(k), "restored": counted.get(k) })))
                .collect()
        };
        json!({
            "job_id": job,
            "at": now,
            "passed": self.failure.is_none(),
            "backup": self.backup.as_ref().map(|b| b.folder.clone()),
            "scratch_database": self.database,
            "drill_instance": match (&self.drill_target, &self.scratch) {
                (Some(DrillTarget::Scratch), Some(s)) => json!({"kind": "scratch", "id": s.id, "name": s.name,
                    "deleted": s.deleted}),
                (Some(DrillTarget::Spare { instance_id }), _) => json!({"kind": "spare", "id": instance_id}),
                _ => Value::Null,
            },
            "nodes": load.nodes,
            "relationships": load.relationships,
            "labels": side(&labels, &self.counted_labels),
            "types": side(&types, &self.counted_types),
            "backup_counts_from": counts_from,
            // Typed backups: whether every label's and type's values and types were read back and
            // compared with the backup's digests, and where those came from (manifest or file).
            "values_compared": self.values_compared,
            "backup_values_from": self.expected_values().map(|(_, from)| from),
            "error": self.failure,
        })
    }

    fn fold(&mut self, done: IoDone) -> Result<Answer, StepError> {
        match (self.step, done) {
            (Step::ReadManifest, IoDone::Manifest(key, manifest)) => {
                let backup = backup_of(&key, &manifest);
                self.step = match self.mode {
                    Mode::Snapshot => {
                        if backup.snapshot_id.is_none() {
                            return Err(StepError::permanent(format!(
                                "backup {} records no Aura snapshot (it was taken with mode {:?}): restore its \
                                 graph export with \"mode\": \"logical\" instead",
                                backup.folder,
                                manifest.provider.get("mode").and_then(Value::as_str).unwrap_or("logical")
                            )));
                        }
                        Step::SnapshotRestore
                    }
                    Mode::Logical | Mode::Drill => {
                        if backup.graph_key.is_none() {
                            return Err(StepError::permanent(format!(
                                "backup {} holds no {GRAPH_FILE} (it was taken with mode \"snapshot\"): restore its \
                                 snapshot with \"mode\": \"snapshot\" instead",
                                backup.folder
                            )));
                        }
                        if self.drill_target == Some(DrillTarget::Scratch) {
                            Step::ReadSourceInstance
                        } else if self.mode == Mode::Drill {
                            Step::EmptyBefore
                        } else {
                            Step::CountTarget
                        }
                    }
                };
                self.backup = Some(backup);
                self.manifest_key = Some(key);
                Ok(Answer::Continue)
            }
            (Step::Load, IoDone::GraphLoaded { cursor, error }) => {
                let cursor = *cursor;
                let finished = cursor.finished;
                self.load = Some(cursor);
                if let Some(e) = error {
                    return Err(e);
                }
                if finished {
                    self.step = Step::Cleanup;
                }
                Ok(Answer::Continue)
            }
            (Step::Record, IoDone::Recorded) => {
                self.step = Step::Done;
                Ok(Answer::Continue)
            }
            (step, done) => Err(StepError::permanent(format!("unexpected {done:?} at {step:?}"))),
        }
    }

    /// Folds in an Aura API answer (token, restore, instance, scratch instance).
    fn api_answer(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        if self.secret_access_token.is_none() {
            let (token, expires) = provider::token_answer(resp, now)?;
            self.secret_access_token = Some(token);
            self.token_expires_at = Some(expires);
            return Ok(Answer::Continue);
        }
        if resp.status == 401 || resp.status == 403 {
            if self.auth_retries < MAX_AUTH_RETRIES {
                self.auth_retries += 1;
                self.secret_access_token = None;
                return Ok(Answer::Continue);
            }
            return Err(StepError::permanent(format!(
                "the Aura API refused the token (HTTP {}): {}",
                resp.status,
                provider::aura_error(resp)
            )));
        }
        if resp.status >= 500 || resp.status == 429 {
            // Aura may have acted on it: look before asking again.
            self.unanswered_post();
        }
        if matches!(self.step, Step::DeleteScratch | Step::DeleteOrphan) && !(200..300).contains(&resp.status) {
            if let Some(answer) = self.delete_refused(resp, now)? {
                return Ok(answer);
            }
        }
        if !(200..300).contains(&resp.status) {
            let words = provider::aura_error(resp);
            if self.step == Step::SnapshotRestore && words.contains("ongoing-database-operation") {
                return Err(StepError::permanent(format!(
                    "Aura refused the restore: the instance is busy with another operation (HTTP {}): {words}; try \
                     again once it is running",
                    resp.status
                )));
            }
            let what = match self.step {
                Step::CreateSent => "creating the drill's scratch instance failed: ",
                Step::WaitRunning => "reading the drill's scratch instance failed: ",
                _ => "",
            };
            return Err(status_error(resp, now, format!("{what}the Aura API answered HTTP {}: {words}", resp.status)));
        }
        self.auth_retries = 0;
        let body: Value = serde_json::from_slice(&resp.body).map_err(|_| malformed("not JSON"))?;
        let status = body.pointer("/data/status").and_then(Value::as_str).map(str::to_string);
        if provider::token_stale(self.token_expires_at, now) {
            self.secret_access_token = None;
        }
        match self.step {
            Step::SnapshotRestore => {
                self.restore_started_at = Some(now);
                self.seen_restoring |= status.as_deref() == Some("restoring");
                self.instance_status = status;
                self.step = Step::PollInstance;
                Ok(Answer::Pending)
            }
            Step::CheckInstance => {
                let status = status.ok_or_else(|| malformed("instance without status"))?;
                self.instance_status = Some(status.clone());
                if status == "restoring" {
                    self.notes.push(
                        "the restore request went unanswered, but the instance is restoring: it took effect".into(),
                    );
                    self.restore_started_at = Some(now);
                    self.seen_restoring = true;
                    self.step = Step::PollInstance;
                    Ok(Answer::Pending)
                } else {
                    self.notes.push(format!(
                        "the restore request went unanswered and the instance is {status}: asking again"
                    ));
                    self.step = Step::SnapshotRestore;
                    Ok(Answer::Continue)
                }
            }
            Step::PollInstance => {
                let status = status.ok_or_else(|| malformed("instance without status"))?;
                self.polls += 1;
                self.instance_status = Some(status.clone());
                let started = self.restore_started_at.unwrap_or(now);
                match status.as_str() {
                    "restoring" => {
                        self.seen_restoring = true;
                        if now.since(started) > RESTORE_TIMEOUT {
                            return Err(StepError::permanent(format!(
                                "instance {} is still restoring after {} h; Ferry stopped watching (the restore \
                                 goes on in Aura)",
                                self.instance_id,
                                RESTORE_TIMEOUT.as_secs() / 3600
                            )));
                        }
                        Ok(Answer::Pending)
                    }
                    "running" if !self.seen_restoring => {
                        // Aura's status lags the POST: `running` may be from before the restore.
                        let waited = now.since(started);
                        if waited < Duration::from_secs(u64::from(self.restoring_wait_seconds)) {
                            return Ok(Answer::Pending);
                        }
                        self.notes.push(format!(
                            "Aura never reported the instance restoring; it was running {} s after the restore \
                             request, which is taken as done (restoring_wait_seconds)",
                            waited.as_secs()
                        ));
                        self.step = Step::Done;
                        Ok(Answer::Continue)
                    }
                    "running" => {
                        self.step = Step::Done;
                        Ok(Answer::Continue)
                    }
                    other => Err(StepError::permanent(format!(
                        "the snapshot restore of instance {} ended with the instance {other:?}",
                        self.instance_id
                    ))),
                }
            }
            Step::ReadSourceInstance => {
                let data = body.get("data").cloned().unwrap_or(Value::Null);
                let settings = self.scratch_settings()?;
                let name = self.scratch()?.name.clone();
                let create = drill::create_body(&settings, &data, &name)?;
                self.scratch_mut()?.create_body = Some(create);
                self.step = Step::CreateInstance;
                Ok(Answer::Continue)
            }
            Step::CreateSent => {
                let made = drill::created(&body)?;
                let s = self.scratch_mut()?;
                s.id = Some(made.id.clone());
                s.query_api_base = Some(made.query_api_base);
                s.username = Some(made.username);
                s.secret_password = Some(made.password);
                s.created_at = Some(now);
                self.notes.push(format!("created the scratch instance {} ({})", made.id, self.scratch()?.name));
                self.step = Step::WaitRunning;
                Ok(Answer::Pending)
            }
            Step::FindScratch | Step::WaitOrphanGone => {
                let name = self.scratch()?.name.clone();
                let found = drill::named(&body, &name)?;
                let failing = self.failure.is_some();
                let deleted = &self.scratch()?.deleted;
                let to_delete: Vec<String> = found.iter().filter(|id| !deleted.contains(id)).cloned().collect();
                if self.step == Step::WaitOrphanGone {
                    if found.is_empty() {
                        self.step = Step::CreateInstance;
                        return Ok(Answer::Continue);
                    }
                    return self.deleting_for_too_long(now).map(|()| Answer::Pending);
                }
                if to_delete.is_empty() {
                    self.step = match (failing, found.is_empty()) {
                        (true, _) => Step::Record,
                        (false, true) => Step::CreateInstance,
                        (false, false) => Step::WaitOrphanGone,
                    };
                    return Ok(Answer::Continue);
                }
                self.scratch_mut()?.orphans = to_delete.clone();
                self.notes.push(format!(
                    "the answer to creating the scratch instance was lost; found {} by its name {name}: deleting \
                     (Aura shows an instance's password only in that answer){}",
                    to_delete.join(", "),
                    if failing { "" } else { ", then creating it again" }
                ));
                self.step = Step::DeleteOrphan;
                Ok(Answer::Continue)
            }
            Step::DeleteOrphan | Step::DeleteScratch => {
                self.deleted_now();
                Ok(Answer::Continue)
            }
            Step::WaitRunning => {
                let status = status.ok_or_else(|| malformed("instance without status"))?;
                match status.as_str() {
                    "running" => {
                        self.step = Step::CreateConstraint;
                        Ok(Answer::Continue)
                    }
                    "creating" => {
                        let s = self.scratch()?;
                        let since = s.created_at.unwrap_or(now);
                        let limit = self.scratch_settings()?.create_timeout_minutes;
                        if now.since(since) > limit {
                            return Err(StepError::permanent(format!(
                                "the drill's scratch instance {} was still creating after {} min \
                                 (drill_scratch.create_timeout_minutes)",
                                s.id.as_deref().unwrap_or("?"),
                                limit.as_secs() / 60
                            )));
                        }
                        Ok(Answer::Pending)
                    }
                    other => Err(StepError::permanent(format!(
                        "the drill's scratch instance {} is {other:?}, not running",
                        self.scratch()?.id.as_deref().unwrap_or("?")
                    ))),
                }
            }
            step => Err(StepError::permanent(format!("an Aura API answer came at {step:?}"))),
        }
    }

    /// A delete that Aura did not accept: gone already (404) or being destroyed counts as done;
    /// busy (409: creating, another operation) is asked again later, within the create timeout.
    fn delete_refused(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Option<Answer>, StepError> {
        let words = provider::aura_error(resp);
        if resp.status == 404 || (resp.status == 409 && words.contains("destroying")) {
            self.deleted_now();
            return Ok(Some(Answer::Continue));
        }
        if resp.status == 409 {
            if self.scratch()?.deleting_since.is_none() {
                self.scratch_mut()?.deleting_since = Some(now);
            }
            self.deleting_for_too_long(now)?;
            return Ok(Some(Answer::Pending));
        }
        Ok(None)
    }

    fn deleting_for_too_long(&mut self, now: Timestamp) -> Result<(), StepError> {
        let limit = self.scratch_settings()?.create_timeout_minutes;
        let s = self.scratch_mut()?;
        let since = *s.deleting_since.get_or_insert(now);
        if now.since(since) > limit {
            return Err(StepError::permanent(format!(
                "deleting the drill's scratch instance did not go through within {} min \
                 (drill_scratch.create_timeout_minutes)",
                limit.as_secs() / 60
            )));
        }
        Ok(())
    }

    /// The instance the current delete step is about is deleted (or gone).
    fn deleted_now(&mut self) {
        let step = self.step;
        let failing = self.failure.is_some();
        let Some(s) = self.scratch.as_mut() else { return };
        s.deleting_since = None;
        if step == Step::DeleteOrphan {
            if !s.orphans.is_empty() {
                let id = s.orphans.remove(0);
                s.deleted.push(id);
            }
            if s.orphans.is_empty() {
                self.step = if failing { Step::Record } else { Step::WaitOrphanGone };
            }
        } else {
            if let Some(id) = s.id.clone() {
                if !s.deleted.contains(&id) {
                    s.deleted.push(id);
                }
            }
            self.step = Step::Record;
        }
    }

    fn unanswered_post(&mut self) {
        if self.secret_access_token.is_none() {
            return;
        }
        match self.step {
            Step::SnapshotRestore => self.step = Step::CheckInstance,
            Step::CreateSent => self.step = Step::FindScratch,
            _ => {}
        }
    }

    /// Folds in a Query API answer.
    fn query_answer(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        let rows = provider::query_rows(resp, now)?;
        let number = |row: &serde_json::Map<String, Value>, field: &str| -> Result<u64, StepError> {
            row.get(field).and_then(Value::as_u64).ok_or_else(|| {
                StepError::permanent(format!("Neo4j Query API: received a malformed response (no {field})"))
            })
        };
        match self.step {
            Step::CountTarget => {
                let n = rows.first().map(|r| number(r, "nodes")).transpose()?.unwrap_or(0);
                if n > 0 {
                    let db = self.database.as_deref().unwrap_or("?");
                    return Err(StepError::permanent(format!(
                        "database {db} is not empty ({n} nodes): a logical load goes into an empty database; nothing \
                         was written (empty it, or name another target)"
                    )));
                }
                self.step = Step::CreateConstraint;
                Ok(Answer::Continue)
            }
            Step::EmptyBefore | Step::EmptyAfter => {
                let n = rows.first().map(|r| number(r, "deleted")).transpose()?.unwrap_or(0);
                self.deleted += n;
                if n == 0 {
                    self.step = match self.step {
                        Step::EmptyBefore => Step::CreateConstraint,
                        _ => Step::DropConstraint,
                    };
                }
                Ok(Answer::Continue)
            }
            Step::CreateConstraint => {
                self.step = Step::Load;
                Ok(Answer::Continue)
            }
            Step::DropConstraint => {
                self.step = if self.mode == Mode::Drill { Step::Record } else { Step::Done };
                Ok(Answer::Continue)
            }
            Step::Cleanup | Step::CleanupRelationships => {
                let n = rows.first().map(|r| number(r, "cleaned")).transpose()?.unwrap_or(0);
                if n == 0 {
                    self.step = match (self.step, self.mode) {
                        (Step::Cleanup, _) => Step::CleanupRelationships,
                        (_, Mode::Drill) => Step::CountLabels,
                        _ => Step::DropConstraint,
                    };
                }
                Ok(Answer::Continue)
            }
            Step::CountLabels | Step::CountTypes => {
                let (field, into) = match self.step {
                    Step::CountLabels => ("label", &mut self.counted_labels),
                    _ => ("type", &mut self.counted_types),
                };
                into.clear();
                for row in &rows {
                    let name = row.get(field).and_then(Value::as_str).ok_or_else(|| {
                        StepError::permanent(format!("Neo4j Query API: received a malformed response (no {field})"))
                    })?;
                    into.insert(name.to_string(), number(row, "n")?);
                }
                if self.step == Step::CountLabels {
                    self.step = Step::CountTypes;
                } else {
                    self.failure = self.compare();
                    if self.failure.is_none() && self.expected_values().is_some() {
                        // The counts match: read the graph back to compare values and types.
                        self.restored_values = Some(ValueDigests::default());
                        self.read_max = None;
                        self.read_next = 0;
                        self.step = Step::ReadNodes;
                    } else {
                        self.step = self.after_compare();
                    }
                }
                Ok(Answer::Continue)
            }
            Step::ReadNodes | Step::ReadRelationships => {
                self.read_back(&rows)?;
                Ok(Answer::Continue)
            }
            step => Err(StepError::permanent(format!("a Query API answer came at {step:?}"))),
        }
    }

    /// Where a drill goes once it compared: delete its scratch instance, or empty its database.
    fn after_compare(&self) -> Step {
        if self.scratch.is_some() {
            Step::DeleteScratch
        } else {
            Step::EmptyAfter
        }
    }

    /// The digests of the typed values the drill compares the restored graph with: those the
    /// manifest recorded when the export was written, else (older typed backups) those the scan
    /// took from the file; `None` for a plain JSON (version 1) file, whose values are not typed.
    fn expected_values(&self) -> Option<(&ValueDigests, &'static str)> {
        let load = self.load.as_ref().filter(|l| l.typed)?;
        match self.backup.as_ref().and_then(|b| b.values.as_ref()) {
            Some(values) => Some((values, "manifest")),
            None => load.values.as_ref().map(|v| (v, "file")),
        }
    }

    /// One answer of the read-back: the phase's highest id, or a page of typed rows folded into
    /// the digests. The last page of the relationships compares them.
    fn read_back(&mut self, rows: &[serde_json::Map<String, Value>]) -> Result<(), StepError> {
        let nodes = self.step == Step::ReadNodes;
        let Some(max) = self.read_max else {
            let max = match rows.first().and_then(|r| r.get("max")) {
                Some(v) => provider::typed_count(v)?,
                None => None,
            };
            match max {
                Some(max) => self.read_max = Some(max),
                None => self.read_phase_done(nodes),
            }
            return Ok(());
        };
        let malformed =
            |what: &str| StepError::permanent(format!("Neo4j Query API: received a malformed response ({what})"));
        let values = self.restored_values.get_or_insert_with(ValueDigests::default);
        for row in rows {
            let props = provider::typed_properties(row.get("props"))?;
            let props = props.as_object().ok_or_else(|| malformed("properties that are not a Map"))?;
            if nodes {
                let labels: Vec<String> = row
                    .get("labels")
                    .and_then(provider::typed_list)
                    .ok_or_else(|| malformed("a row whose labels are not a List"))?
                    .iter()
                    .map(|l| {
                        provider::typed_text(l)
                            .map(str::to_string)
                            .ok_or_else(|| malformed("a label that is not a String"))
                    })
                    .collect::<Result<_, _>>()?;
                values.add_node(&labels, props);
            } else {
                let rel_type = row
                    .get("type")
                    .and_then(provider::typed_text)
                    .ok_or_else(|| malformed("a row whose type is not a String"))?;
                values.add_relationship(rel_type, props);
            }
        }
        let to = self.read_next.saturating_add(u64::from(self.batch_size.max(1)) - 1).min(max);
        if to >= max {
            self.read_phase_done(nodes);
        } else {
            self.read_next = to + 1;
        }
        Ok(())
    }

    fn read_phase_done(&mut self, nodes: bool) {
        self.read_max = None;
        self.read_next = 0;
        if nodes {
            self.step = Step::ReadRelationships;
        } else {
            self.failure = self.compare_values();
            self.values_compared = true;
            self.step = self.after_compare();
        }
    }

    /// The read-back's finding: `None` when every label's and type's typed values are the
    /// backup's.
    fn compare_values(&self) -> Option<String> {
        let (expected, _) = self.expected_values()?;
        let found = expected.differences(self.restored_values.as_ref()?, 5);
        let folder = self.backup.as_ref().map_or("?", |b| b.folder.as_str());
        (!found.is_empty()).then(|| format!("drill of backup {folder} failed: {}", found.join("; ")))
    }

    /// The drill's finding: `None` when every label and type has what the backup holds.
    fn compare(&self) -> Option<String> {
        self.load.as_ref()?;
        let (labels, types, _) = self.expected();
        let mut findings = Vec::new();
        for (what, expected, counted) in
            [("label", &labels, &self.counted_labels), ("type", &types, &self.counted_types)]
        {
            let kind = if what == "label" { "nodes" } else { "relationships" };
            for name in expected.keys().chain(counted.keys().filter(|k| !expected.contains_key(*k))) {
                let (want, got) = (expected.get(name).copied().unwrap_or(0), counted.get(name).copied().unwrap_or(0));
                if want != got {
                    findings.push(format!("{what} {name:?}: {got} {kind} restored, {want} in the backup"));
                }
            }
        }
        let folder = self.backup.as_ref().map_or("?", |b| b.folder.as_str());
        (!findings.is_empty()).then(|| format!("drill of backup {folder} failed: {}", findings.join("; ")))
    }

    fn cleanup_first(&mut self, message: String) -> bool {
        if self.mode != Mode::Drill || self.backup.is_none() {
            return false;
        }
        if let Some(s) = &self.scratch {
            let (id, created) = (s.id.clone(), s.creates > 0);
            match self.step {
                Step::Record | Step::Done => return false,
                Step::DeleteScratch | Step::DeleteOrphan | Step::WaitOrphanGone | Step::FindScratch
                    if self.failure.is_some() || self.step == Step::DeleteScratch =>
                {
                    let what = match (&id, self.step) {
                        (Some(id), Step::DeleteScratch) => format!("the scratch instance {id}"),
                        _ => format!("the instances named {}", s.name),
                    };
                    let cleanup = format!("deleting {what} failed: {message}; delete it in the Aura console");
                    self.failure = Some(match self.failure.take() {
                        Some(prior) => format!("{prior}; {cleanup}"),
                        None => cleanup,
                    });
                    self.step = Step::Record;
                }
                _ => {
                    self.failure = Some(message);
                    self.step = match (id, created) {
                        (Some(_), _) => Step::DeleteScratch,
                        (None, true) => Step::FindScratch,
                        (None, false) => Step::Record,
                    };
                }
            }
            return true;
        }
        match self.step {
            Step::Record | Step::Done => false,
            Step::EmptyAfter | Step::DropConstraint => {
                let db = self.database.clone().unwrap_or_default();
                let what = if self.step == Step::EmptyAfter { "emptying" } else { "dropping the import constraint of" };
                let emptying = format!("{what} the drill database {db} failed: {message}");
                self.failure = Some(match self.failure.take() {
                    Some(prior) => format!("{prior}; {emptying}"),
                    None => emptying,
                });
                self.step = Step::Record;
                true
            }
            _ => {
                self.failure = Some(message);
                self.step = Step::EmptyAfter;
                true
            }
        }
    }
}

impl Restorer for AuraRestore {
    fn next(&self, cx: &RestoreCx<'_>) -> Result<Next, StepError> {
        let ProviderConfig::Aura(cfg) = &cx.source.provider else {
            return Err(StepError::permanent("an Aura restore of a source that is no longer an Aura source"));
        };
        // An encrypted backup's graph file is read with the source's age identity.
        let sealed = self.backup.as_ref().is_some_and(|b| b.graph_sealed.is_some());
        let identity = match (&cx.source.age_identity_secret, sealed) {
            (Some(name), true) => Some(cx.creds.get(name)?),
            _ => None,
        };
        self.next_with(cfg, cx.creds, identity, cx.job, cx.now)
    }

    fn sending(&mut self, job: &JobId) {
        let token = self.secret_access_token.is_some();
        if let Some(s) = self.scratch.as_mut() {
            if s.name.is_empty() {
                s.name = drill::scratch_name(&job.to_string());
            }
            // Persisted before the request goes out: woken at `CreateSent`, the create's answer
            // was lost, and the instance is looked for by name instead of created again.
            match self.step {
                Step::CreateInstance if token => {
                    s.creates += 1;
                    self.step = Step::CreateSent;
                }
                Step::CreateSent if token => self.step = Step::FindScratch,
                _ => {}
            }
        }
    }

    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        if self.is_api_step() {
            self.api_answer(resp, now)
        } else {
            self.query_answer(resp, now)
        }
    }

    fn on_io(&mut self, done: IoDone, _now: Timestamp) -> Result<Answer, StepError> {
        self.fold(done)
    }

    fn unanswered(&mut self, _message: &str) -> Option<String> {
        self.unanswered_post();
        None
    }

    fn fail_after_cleanup(&mut self, message: String) -> bool {
        self.cleanup_first(message)
    }

    fn backup_folder(&self) -> Option<String> {
        self.backup.as_ref().map(|b| b.folder.clone())
    }
}

/// The backup's snapshot and graph file, from its manifest.
fn backup_of(key: &str, manifest: &Manifest) -> BackupRef {
    let folder = crate::manifest::folder_of(key).unwrap_or_default().to_string();
    let sealed_name = format!("{GRAPH_FILE}{}", crate::transfer::sealed::SUFFIX);
    let graph = manifest
        .artifacts
        .iter()
        .find(|a| a.filename == GRAPH_FILE || (crate::transfer::sealed::is_encrypted(a) && a.filename == sealed_name));
    let counts = |field: &str| -> Option<BTreeMap<String, u64>> {
        let details = graph?.details.as_ref()?;
        serde_json::from_value(details.get(field)?.clone()).ok()
    };
    BackupRef {
        folder,
        snapshot_id: manifest.provider.pointer("/snapshot/snapshot_id").and_then(Value::as_str).map(str::to_string),
        graph_key: graph.map(|a| a.key.clone()),
        labels: counts("labels"),
        types: counts("types"),
        values: graph
            .and_then(|a| a.details.as_ref()?.get("values").cloned())
            .and_then(|v| serde_json::from_value(v).ok()),
        graph_sealed: graph.filter(|a| crate::transfer::sealed::is_encrypted(a)).map(|a| a.size),
    }
}
