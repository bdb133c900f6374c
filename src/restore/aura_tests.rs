//! Aura snapshot restores, logical loads and drills, driven through the job state machine with
//! canned Aura and Query API answers; the graph loader fed lines directly.

use serde_json::{json, Value};

use super::aura::{
    GraphLoader, LoadCursor, CREATE_IMPORT_CONSTRAINT, DELETE_BATCH, DROP_IMPORT_CONSTRAINT, LABEL_COUNTS, TYPE_COUNTS,
};
use super::driver::{driven, Driver};
use super::*;
use crate::config::{Config, SourceConfig};
use crate::http::{HttpRequest, HttpResponse};
use crate::identity::Trigger;
use crate::job::{Action, Event, Phase};
use crate::manifest::Artifact;
use crate::secret::Secret;
use crate::time::Timestamp;

const FOLDER: &str = "graph/2026-11-23T030000Z-00000000000000aa/";
const SID: &str = "afdb4e9d-6ba6-4d45-b951-f82843dcbca6";

fn source() -> SourceConfig {
    Config::from_value(&json!([{
        "name": "graph", "kind": "aura", "schedule": "0 3 * * *", "instance_id": "2f49c2b3",
        "client_id_secret": "CID", "client_secret_secret": "CSEC", "db_password_secret": "PW",
        "api_base": "http://aura.test", "query_api_base": "http://db.test", "drill_database": "scratch",
        "retry": {"max_attempts": 2, "base_ms": 1000, "max_delay_ms": 8000}
    }]))
    .unwrap()
    .sources
    .remove(0)
}

fn t0() -> Timestamp {
    Timestamp::parse_rfc3339("2026-11-23T10:00:00Z").unwrap()
}

fn manifest(snapshot: bool) -> Manifest {
    Manifest {
        source: "graph".into(),
        kind: "aura".into(),
        job_id: JobId::new("00000000000000aa"),
        trigger: Trigger::Cron,
        started_at: t0(),
        scheduled_for: None,
        finished_at: t0(),
        provider: json!({"instance_id": "2f49c2b3", "mode": if snapshot { "both" } else { "logical" },
            "snapshot": if snapshot { json!({"snapshot_id": SID, "status": "Completed"}) } else { Value::Null }}),
        artifacts: vec![Artifact::sample(
            format!("{FOLDER}graph.jsonl.gz"),
            "graph.jsonl.gz",
            100,
            "s",
            "application/gzip",
        )],
    }
}

driven!(H);

impl H {
    fn new(task: Task, params: Value) -> Result<Self, String> {
        let backup = (task == Task::Restore).then(|| format!("{FOLDER}manifest.json"));
        let secrets = [("CID", "id"), ("CSEC", "sec"), ("PW", "pw")];
        Driver::start(task, source(), &params, backup, &secrets, t0()).map(Self)
    }

    fn answer(&mut self, status: u16, body: Value) -> Action {
        self.feed(Event::Response(HttpResponse::json(status, &body)))
    }

    fn manifest(&mut self, m: Manifest) {
        assert!(matches!(self.io(), Io::ReadManifest { .. }));
        self.feed(Event::RestoreIo(Ok(IoDone::Manifest(format!("{FOLDER}manifest.json"), Box::new(m)))));
    }

    fn token(&mut self) {
        let req = self.request();
        assert!(req.url.ends_with("/oauth/token"), "{}", req.url);
        self.answer(200, json!({"access_token": "T", "expires_in": 3600, "token_type": "bearer"}));
    }

    /// The helper property and constraint of this job's load.
    fn helper(&self) -> aura::Helper {
        aura::Helper::for_job(&self.job.id)
    }

    fn rows(&mut self, fields: &[&str], values: Value) -> Action {
        self.answer(202, json!({"data": {"fields": fields, "values": values}, "bookmarks": ["FB:x"]}))
    }
}

fn statement(req: &HttpRequest) -> String {
    let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
    body["statement"].as_str().unwrap().to_string()
}

#[test]
fn a_snapshot_restore_needs_the_instance_id_in_confirm_and_a_mode() {
    assert!(H::new(Task::Restore, json!({"mode": "snapshot"})).err().unwrap().contains("\"2f49c2b3\""));
    assert!(H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "neo4j"})).is_err());
    assert!(H::new(Task::Restore, json!({"confirm": "2f49c2b3"})).err().unwrap().contains("\"mode\""));
    assert!(H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3"})).is_ok());
    let e = H::new(Task::Restore, json!({"mode": "logical", "target": {"database": "copy"}, "confirm": "neo4j"}));
    assert!(e.err().unwrap().contains("\"copy\""));
}

#[test]
fn a_snapshot_restore_posts_the_manifests_snapshot_and_polls_until_running() {
    let mut h = H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3"})).unwrap();
    h.manifest(manifest(true));
    h.token();
    let post = h.request();
    assert_eq!(post.url, format!("http://aura.test/v1/instances/2f49c2b3/snapshots/{SID}/restore"));
    assert_eq!(post.header_value("authorization"), Some("Bearer T"));
    assert!(matches!(h.answer(202, json!({"data": {"id": "2f49c2b3", "status": "restoring"}})), Action::Sleep(_)));
    let poll = h.request();
    assert_eq!(poll.url, "http://aura.test/v1/instances/2f49c2b3");
    assert!(matches!(h.answer(200, json!({"data": {"status": "restoring"}})), Action::Sleep(_)));
    h.request();
    h.answer(200, json!({"data": {"status": "running"}}));
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Restored);
    assert!(h.job.note.as_deref().unwrap().contains(SID));
}

#[test]
fn a_snapshot_restore_of_a_logical_only_backup_fails_saying_so() {
    let mut h = H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3"})).unwrap();
    h.manifest(manifest(false));
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains("records no Aura snapshot"), "{:?}", h.job.error);
}

#[test]
fn an_unanswered_restore_post_reads_the_instance_before_asking_again() {
    let mut h = H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3"})).unwrap();
    h.manifest(manifest(true));
    h.token();
    h.request();
    h.feed(Event::Unreachable("timed out".into()));
    let check = h.request();
    assert_eq!(
        (check.method, check.url.as_str()),
        (crate::http::Method::Get, "http://aura.test/v1/instances/2f49c2b3")
    );
    h.answer(200, json!({"data": {"status": "restoring"}}));
    let poll = h.request();
    assert_eq!(poll.method, crate::http::Method::Get, "the POST is not sent again");
    h.answer(200, json!({"data": {"status": "running"}}));
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored);
}

#[test]
fn a_failed_instance_status_and_a_busy_instance_fail_in_auras_words() {
    let mut h = H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3"})).unwrap();
    h.manifest(manifest(true));
    h.token();
    h.request();
    h.answer(202, json!({"data": {"status": "restoring"}}));
    h.request();
    h.answer(200, json!({"data": {"status": "loading failed"}}));
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains("\"loading failed\""));

    let mut h = H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3"})).unwrap();
    h.manifest(manifest(true));
    h.token();
    h.request();
    h.answer(
        409,
        json!({"errors": [{"message": "The database is current undergoing an operation: resuming",
        "reason": "ongoing-database-operation"}]}),
    );
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains("undergoing an operation: resuming"));
}

#[test]
fn a_logical_load_refuses_a_target_that_is_not_empty() {
    let mut h =
        H::new(Task::Restore, json!({"mode": "logical", "target": {"database": "copy"}, "confirm": "copy"})).unwrap();
    h.manifest(manifest(false));
    let count = h.request();
    assert_eq!(count.url, "http://db.test/db/copy/query/v2");
    assert_eq!(statement(&count), "MATCH (n) RETURN count(n) AS nodes");
    h.rows(&["nodes"], json!([[3]]));
    assert_eq!(h.job.phase, Phase::Failed);
    assert!(h.job.error.as_deref().unwrap().contains("not empty (3 nodes)"));
}

fn lines() -> Vec<String> {
    vec![
        json!({"type": "header", "format": "ferry-neo4j-jsonl", "version": 1}).to_string(),
        json!({"type": "node", "id": "a", "labels": ["P"], "properties": {"x": 1}}).to_string(),
        json!({"type": "node", "id": "b", "labels": ["C"], "properties": {}}).to_string(),
        json!({"type": "node", "id": "c", "labels": ["P"], "properties": {}}).to_string(),
        json!({"type": "relationship", "id": "r", "rel_type": "K", "start": "a", "end": "b", "properties": {}})
            .to_string(),
        json!({"type": "footer", "nodes": 3, "relationships": 1}).to_string(),
    ]
}

/// Runs a whole scan and load through the loader; returns the statements sent.
fn run_loader(lines: &[String], batch: u32) -> Result<(LoadCursor, Vec<(String, usize)>), StepError> {
    let mut cursor = LoadCursor::default();
    let mut sent = Vec::new();
    for _ in 0..2 {
        let mut loader = GraphLoader::new(cursor.clone(), batch);
        for l in lines {
            if let Some(groups) = loader.line(l.as_bytes())? {
                for g in &groups {
                    sent.push((g.statement.clone(), g.rows.len()));
                    loader.sent();
                }
                loader.chunk_done(&groups);
            }
        }
        if let Some(groups) = loader.end()? {
            for g in &groups {
                sent.push((g.statement.clone(), g.rows.len()));
                loader.sent();
            }
            loader.last_chunk_done(&groups);
        }
        cursor = loader.cursor.clone();
    }
    Ok((cursor, sent))
}

#[test]
fn the_loader_scans_then_sends_nodes_before_relationships_one_statement_per_label_set() {
    let (cursor, sent) = run_loader(&lines(), 2).unwrap();
    assert!(cursor.finished);
    assert_eq!(cursor.labels, [("C".to_string(), 1), ("P".to_string(), 2)].into_iter().collect());
    assert_eq!(cursor.types, [("K".to_string(), 1)].into_iter().collect());
    assert_eq!((cursor.loaded_nodes, cursor.loaded_relationships), (3, 1));
    let expected = vec![
        (aura::node_statement(&["P".into()]), 1),
        (aura::node_statement(&["C".into()]), 1),
        (aura::node_statement(&["P".into()]), 1),
        (aura::relationship_statement("K"), 1),
    ];
    assert_eq!(sent, expected);
}

#[test]
fn a_file_without_footer_or_with_wrong_totals_or_out_of_order_is_refused_before_any_statement() {
    let mut no_footer = lines();
    no_footer.pop();
    assert!(run_loader(&no_footer, 10).unwrap_err().message().contains("no footer"));
    let mut wrong = lines();
    *wrong.last_mut().unwrap() = json!({"type": "footer", "nodes": 2, "relationships": 1}).to_string();
    assert!(run_loader(&wrong, 10).unwrap_err().message().contains("footer lists 2 nodes"));
    let mut order = lines();
    order.swap(3, 4);
    assert!(run_loader(&order, 10).unwrap_err().message().contains("a node after the relationships"));
}

#[test]
fn a_load_cut_short_mid_chunk_goes_on_with_the_next_statement_of_that_chunk() {
    let (scanned, _) = {
        let mut loader = GraphLoader::new(LoadCursor::default(), 10);
        for l in lines() {
            loader.line(l.as_bytes()).unwrap();
        }
        loader.end().unwrap();
        (loader.cursor.clone(), ())
    };
    // Step 1: the only chunk is the file's end; send its first statement, then stop.
    let mut loader = GraphLoader::new(scanned, 10);
    for l in lines() {
        assert!(loader.line(l.as_bytes()).unwrap().is_none());
    }
    let groups = loader.end().unwrap().unwrap();
    assert_eq!(groups.len(), 3, "P, C, K");
    loader.sent();
    let saved = loader.cursor.clone();
    assert_eq!(saved.groups_done, 1);
    // Step 2 rebuilds the same chunk and sends the rest.
    let mut loader = GraphLoader::new(saved, 10);
    for l in lines() {
        loader.line(l.as_bytes()).unwrap();
    }
    let again = loader.end().unwrap().unwrap();
    assert_eq!(again, groups);
    assert_eq!(loader.cursor.groups_done, 1, "the first statement is not sent again");
}

#[test]
fn a_drill_empties_loads_compares_per_label_and_type_empties_again_and_records() {
    let mut h = H::new(Task::Drill, json!({})).unwrap();
    h.manifest(manifest(true));
    let del = h.request();
    assert_eq!((del.url.as_str(), statement(&del)), ("http://db.test/db/scratch/query/v2", DELETE_BATCH.to_string()));
    h.rows(&["deleted"], json!([[5]]));
    h.request();
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().create_constraint(), "the constraint before the first node");
    h.rows(&[], json!([]));
    let Io::GraphLoad(order) = h.io() else { panic!("expected the load") };
    assert_eq!(order.key, format!("{FOLDER}graph.jsonl.gz"));
    let (cursor, _) = run_loader(&lines(), 500).unwrap();
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(cursor), error: None })));
    let cleanup = h.request();
    assert_eq!(statement(&cleanup), h.helper().cleanup_nodes());
    h.rows(&["cleaned"], json!([[3]]));
    assert_eq!(statement(&h.request()), h.helper().cleanup_nodes(), "again until nothing is left");
    h.rows(&["cleaned"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().cleanup_relationships());
    h.rows(&["cleaned"], json!([[0]]));
    assert_eq!(statement(&h.request()), LABEL_COUNTS);
    h.rows(&["label", "n"], json!([["P", 2]]));
    assert_eq!(statement(&h.request()), TYPE_COUNTS);
    h.rows(&["type", "n"], json!([["K", 1]]));
    assert_eq!(statement(&h.request()), DELETE_BATCH);
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().drop_constraint());
    h.rows(&[], json!([]));
    let Io::Record { key, record } = h.io() else { panic!("expected the record") };
    assert_eq!(key, format!("{FOLDER}drill.json"));
    assert_eq!(record["passed"], json!(false));
    assert_eq!(record["labels"]["C"], json!({"backup": 1, "restored": null}));
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
    let error = h.job.error.clone().unwrap();
    assert!(error.contains("label \"C\": 0 nodes restored, 1 in the backup"), "{error}");
    assert!(!error.contains("\"P\""), "{error}");
}

#[test]
fn a_drill_that_fails_while_loading_still_empties_the_database_and_records() {
    let mut h = H::new(Task::Drill, json!({})).unwrap();
    h.manifest(manifest(true));
    h.request();
    h.rows(&["deleted"], json!([[0]]));
    h.request();
    h.rows(&[], json!([]));
    h.io();
    let err = StepError::permanent("graph.jsonl.gz has no footer line");
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::default(), error: Some(err) })));
    assert_eq!(statement(&h.request()), DELETE_BATCH);
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().drop_constraint(), "the constraint goes too");
    h.rows(&[], json!([]));
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    assert_eq!(record["passed"], json!(false));
    assert!(record["error"].as_str().unwrap().contains("no footer"));
}

#[test]
fn a_drill_needs_a_drill_database() {
    let mut src = source();
    if let crate::providers::ProviderConfig::Aura(cfg) = &mut src.provider {
        cfg.drill_database = None;
    }
    let e = plan(Task::Drill, &src, &json!({}), None).unwrap_err();
    assert!(e.contains("drill_database"), "{e}");
}

#[test]
fn load_statements_merge_on_the_export_id_under_the_import_label_so_sending_one_again_duplicates_nothing() {
    let nodes = aura::node_statement(&["P".into(), "We`ird".into()]);
    assert_eq!(
        nodes,
        "UNWIND $rows AS row MERGE (n:`_FerryImport` {`_ferry_id`: row.id}) SET n:`P`:`We``ird`, n += row.props"
    );
    assert!(!nodes.contains("CREATE") && !nodes.contains("SET n ="), "= would drop _ferry_id");
    let rels = aura::relationship_statement("K");
    assert_eq!(
        rels,
        "UNWIND $rows AS row MATCH (a:`_FerryImport` {`_ferry_id`: row.start}), (b:`_FerryImport` {`_ferry_id`: \
         row.end}) MERGE (a)-[r:`K` {`_ferry_id`: row.id}]->(b) SET r += row.props",
        "endpoints found in the import label's index, the relationship keyed by its own id"
    );
    // The rows carry the ids the statements merge on.
    let mut scan = GraphLoader::new(LoadCursor::default(), 10);
    for l in lines() {
        scan.line(l.as_bytes()).unwrap();
    }
    scan.end().unwrap();
    let mut loader = GraphLoader::new(scan.cursor, 10);
    for l in lines() {
        loader.line(l.as_bytes()).unwrap();
    }
    let groups = loader.end().unwrap().unwrap();
    assert_eq!(groups[0].rows[0], json!({"id": "a", "props": {"x": 1}}));
    assert_eq!(groups[2].rows[0], json!({"id": "r", "start": "a", "end": "b", "props": {}}));
}

/// A drill of `m` (request `params`) that emptied its database, made its constraint, loaded
/// `file` and cleaned up: the next request counts the labels.
fn loaded_drill(m: Manifest, file: &[String], params: Value) -> H {
    let mut h = H::new(Task::Drill, params).unwrap();
    h.manifest(m);
    h.request();
    h.rows(&["deleted"], json!([[0]]));
    h.request();
    h.rows(&[], json!([]));
    h.io();
    let (cursor, _) = run_loader(file, 500).unwrap();
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(cursor), error: None })));
    for _ in 0..2 {
        h.request();
        h.rows(&["cleaned"], json!([[0]]));
    }
    h
}

/// Runs a drill whose load read `lines()` (P: 2, C: 1; K: 1) and whose database counts what the
/// file holds; returns the record and the job's error.
fn drill_with(m: Manifest) -> (Value, Option<String>) {
    let mut h = loaded_drill(m, &lines(), json!({}));
    assert_eq!(statement(&h.request()), LABEL_COUNTS);
    h.rows(&["label", "n"], json!([["P", 2], ["C", 1]]));
    h.request();
    h.rows(&["type", "n"], json!([["K", 1]]));
    finish_drill(&mut h)
}

/// A drill that compared: it empties its database, drops its constraint and records; returns the
/// record and the job's error.
fn finish_drill(h: &mut H) -> (Value, Option<String>) {
    assert_eq!(statement(&h.request()), DELETE_BATCH);
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().drop_constraint());
    h.rows(&[], json!([]));
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    (record, h.job.error.clone())
}

#[test]
fn a_drill_compares_with_the_counts_the_manifest_recorded_so_an_altered_file_fails_naming_the_label() {
    // The manifest says the export wrote a label Q the file no longer holds (its footer rewritten).
    let mut m = manifest(true);
    m.artifacts[0].details = Some(json!({"format": "ferry-neo4j-jsonl", "nodes": 5, "relationships": 2,
        "labels": {"P": 2, "C": 1, "Q": 2}, "types": {"K": 1, "L": 1}}));
    let (record, error) = drill_with(m);
    let error = error.expect("the drill fails");
    assert!(error.contains("label \"Q\": 0 nodes restored, 2 in the backup"), "{error}");
    assert!(error.contains("type \"L\": 0 relationships restored, 1 in the backup"), "{error}");
    assert!(!error.contains("\"P\""), "{error}");
    assert_eq!(record["backup_counts_from"], json!("manifest"));
    assert_eq!(record["labels"]["Q"], json!({"backup": 2, "restored": null}));
    // The same file with the counts matching: passes.
    let mut m = manifest(true);
    m.artifacts[0].details =
        Some(json!({"nodes": 3, "relationships": 1, "labels": {"P": 2, "C": 1}, "types": {"K": 1}}));
    let (record, error) = drill_with(m);
    assert_eq!((error, record["passed"].clone()), (None, json!(true)));
}

#[test]
fn a_drill_of_a_backup_without_recorded_counts_compares_with_the_file() {
    let (record, error) = drill_with(manifest(true));
    assert_eq!(error, None);
    assert_eq!(record["backup_counts_from"], json!("file"));
    assert_eq!(record["labels"]["P"], json!({"backup": 2, "restored": 2}));
}

// ----- reading the export member by member ---------------------------------------------------

use super::aura::{MemberLines, Piece};
use std::io::Write as _;

/// A concatenation of gzip members, one per text; returns the bytes and each member's end offset.
fn members(texts: &[&str]) -> (Vec<u8>, Vec<u64>) {
    let mut bytes = Vec::new();
    let mut ends = Vec::new();
    for t in texts {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(t.as_bytes()).unwrap();
        bytes.extend(e.finish().unwrap());
        ends.push(bytes.len() as u64);
    }
    (bytes, ends)
}

/// Everything `MemberLines` reports reading `data[from..]` in chunks of `chunk` bytes.
fn pieces(data: &[u8], from: u64, chunk: usize) -> Result<Vec<Piece>, StepError> {
    let mut lines = MemberLines::new(from, 1 << 20);
    let mut input = data[from as usize..].chunks(chunk);
    let mut out = Vec::new();
    loop {
        match lines.next_piece()? {
            Piece::NeedInput => match input.next() {
                Some(c) => lines.feed(c.to_vec()),
                None => lines.end_input(),
            },
            Piece::Done => return Ok(out),
            p => out.push(p),
        }
    }
}

fn text_lines(p: &[Piece]) -> Vec<String> {
    p.iter()
        .filter_map(|p| match p {
            Piece::Line(l) => Some(String::from_utf8(l.clone()).unwrap()),
            _ => None,
        })
        .collect()
}

#[test]
fn member_boundaries_are_found_exactly_and_reading_from_one_gives_exactly_the_lines_after_it() {
    let texts = ["h\na1\na2\n", "b1\n", "", "c1\nc2\nc3\n", "d1\n"];
    let (data, ends) = members(&texts);
    let all: Vec<String> = texts.concat().lines().map(str::to_string).collect();
    for chunk in [1, 2, 3, 7, 16, 64, data.len()] {
        let got = pieces(&data, 0, chunk).unwrap();
        assert_eq!(text_lines(&got), all, "chunk {chunk}");
        let found: Vec<u64> = got
            .iter()
            .filter_map(|p| match p {
                Piece::MemberEnd(o) => Some(*o),
                _ => None,
            })
            .collect();
        assert_eq!(found, ends[..ends.len() - 1].to_vec(), "every member end but the file's, chunk {chunk}");
        // Each boundary comes after exactly the lines of the members before it.
        let mut before = 0;
        for p in &got {
            match p {
                Piece::Line(_) => before += 1,
                Piece::MemberEnd(o) => {
                    let i = ends.iter().position(|e| e == o).unwrap();
                    assert_eq!(before, texts[..=i].concat().lines().count());
                    let rest = text_lines(&pieces(&data, *o, chunk).unwrap());
                    assert_eq!(rest, all[before..].to_vec(), "resumed at {o}");
                }
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn a_line_running_on_into_the_next_member_is_whole_and_no_boundary_is_offered_inside_it() {
    let (data, ends) = members(&["x1\nx2-part", "-rest\ny1\n", "z1"]);
    let got = pieces(&data, 0, 5).unwrap();
    assert_eq!(text_lines(&got), ["x1", "x2-part-rest", "y1", "z1"]);
    assert!(got.contains(&Piece::MemberEnd(ends[1])));
    assert!(!got.contains(&Piece::MemberEnd(ends[0])), "x2 runs on into the second member");
}

#[test]
fn corrupt_or_truncated_gzip_is_refused() {
    let (mut data, ends) = members(&["a\n", "b\n"]);
    let crc = ends[0] as usize - 8;
    data[crc] ^= 0xff;
    assert!(pieces(&data, 0, 4).unwrap_err().message().contains("not valid gzip"));
    let (data, _) = members(&["a\n", "b\n"]);
    assert!(pieces(&data[..data.len() - 3], 0, 4).is_err(), "cut inside the last trailer");
    assert!(pieces(&[0x1f, 0x8b, 0x08, 0, 0, 0], 0, 4).is_err());
    assert_eq!(pieces(&[], 0, 4).unwrap(), vec![], "an empty read ends cleanly");
}

/// One runtime step: reads from the loader's member, sends at most `max` statements (recorded in
/// `sent`), returns the compressed bytes it read.
fn step(data: &[u8], loader: &mut GraphLoader, max: usize, sent: &mut Vec<(String, Vec<Value>)>) -> usize {
    let from = loader.read_from();
    let mut lines = MemberLines::new(from, 1 << 20);
    let mut input = data[from as usize..].chunks(7);
    let mut read = 0;
    let mut budget = 0;
    let mut send = |loader: &mut GraphLoader, groups: &[aura::Group], budget: &mut usize| -> bool {
        while (loader.cursor.groups_done as usize) < groups.len() {
            if *budget >= max {
                return false;
            }
            let g = &groups[loader.cursor.groups_done as usize];
            sent.push((g.statement.clone(), g.rows.clone()));
            loader.sent();
            *budget += 1;
        }
        true
    };
    loop {
        match lines.next_piece().unwrap() {
            Piece::Line(l) => {
                if let Some(groups) = loader.line(&l).unwrap() {
                    if !send(loader, &groups, &mut budget) {
                        return read;
                    }
                    loader.chunk_done(&groups);
                    if budget >= max {
                        return read;
                    }
                }
            }
            Piece::MemberEnd(o) => loader.member_end(o),
            Piece::NeedInput => match input.next() {
                Some(c) => {
                    read += c.len();
                    lines.feed(c.to_vec());
                }
                None => lines.end_input(),
            },
            Piece::Done => break,
        }
    }
    if let Some(groups) = loader.end().unwrap() {
        if send(loader, &groups, &mut budget) {
            loader.last_chunk_done(&groups);
        }
    }
    read
}

#[test]
fn a_load_resumed_from_member_boundaries_sends_exactly_what_a_load_in_one_go_sends_reading_less() {
    // An export of 40 nodes and 30 relationships, one member per 7 lines (as export slices make).
    let mut all = vec![json!({"type": "header", "format": "ferry-neo4j-jsonl", "version": 1}).to_string()];
    for i in 0..40 {
        let label = ["P", "C", "Q"][i % 3];
        all.push(json!({"type": "node", "id": format!("n{i}"), "labels": [label], "properties": {"i": i}}).to_string());
    }
    for i in 0..30 {
        all.push(
            json!({"type": "relationship", "id": format!("r{i}"), "rel_type": (["K", "L"][i % 2]),
                   "start": format!("n{i}"), "end": format!("n{}", i + 1), "properties": {}})
            .to_string(),
        );
    }
    all.push(json!({"type": "footer", "nodes": 40, "relationships": 30}).to_string());
    let texts: Vec<String> = all.chunks(7).map(|c| c.iter().map(|l| format!("{l}\n")).collect()).collect();
    let (data, _) = members(&texts.iter().map(String::as_str).collect::<Vec<_>>());

    // In one go.
    let mut whole = Vec::new();
    let mut loader = GraphLoader::new(LoadCursor::default(), 4);
    while !loader.done() {
        step(&data, &mut loader, usize::MAX, &mut whole);
        loader = GraphLoader::new(loader.cursor.clone(), 4);
    }
    // Two statements a step, the cursor persisted as JSON between steps.
    let mut resumed = Vec::new();
    let mut cursor = LoadCursor::default();
    let (mut steps, mut reads, mut offsets) = (0, Vec::new(), Vec::new());
    while !cursor.finished {
        let mut loader = GraphLoader::new(cursor.clone(), 4);
        offsets.push(loader.read_from());
        reads.push(step(&data, &mut loader, 2, &mut resumed));
        cursor = serde_json::from_str(&serde_json::to_string(&loader.cursor).unwrap()).unwrap();
        assert!(cursor.resume_line <= cursor.lines_done);
        steps += 1;
        assert!(steps < 200);
    }
    assert_eq!(resumed, whole, "the same statements with the same rows, none twice");
    assert!(cursor.loaded_nodes == 40 && cursor.loaded_relationships == 30);
    let load_offsets: Vec<u64> = offsets.iter().copied().skip_while(|o| *o > 0).skip_while(|o| *o == 0).collect();
    assert!(load_offsets.windows(2).all(|w| w[0] <= w[1]) && load_offsets.len() > 5, "{offsets:?}");
    let last = *reads.last().unwrap();
    assert!(last < data.len() / 3, "the last step read {last} of {} bytes", data.len());
}

// ----- the import label and its constraint ----------------------------------------------------

#[test]
fn a_node_without_labels_is_merged_under_the_import_label_alone() {
    let nodes = aura::node_statement(&[]);
    assert_eq!(nodes, "UNWIND $rows AS row MERGE (n:`_FerryImport` {`_ferry_id`: row.id}) SET n += row.props");
    let mut file = lines();
    file.insert(1, json!({"type": "node", "id": "z", "labels": [], "properties": {"y": 2}}).to_string());
    file.insert(2, json!({"type": "node", "id": "w", "properties": {}}).to_string());
    *file.last_mut().unwrap() = json!({"type": "footer", "nodes": 5, "relationships": 1}).to_string();
    let (cursor, sent) = run_loader(&file, 10).unwrap();
    assert_eq!(sent[0], (nodes, 2), "both unlabelled nodes in one statement");
    assert_eq!(cursor.loaded_nodes, 5);
}

#[test]
fn an_export_with_a_node_labelled_with_the_import_label_is_refused_by_the_scan() {
    let mut file = lines();
    file[2] = json!({"type": "node", "id": "b", "labels": ["C", "_FerryImport"], "properties": {}}).to_string();
    let e = run_loader(&file, 10).unwrap_err();
    assert!(e.message().contains("line 3: a node labelled _FerryImport"), "{}", e.message());
}

#[test]
fn a_logical_load_makes_the_import_constraint_before_loading_and_drops_it_after_the_cleanup() {
    let mut h =
        H::new(Task::Restore, json!({"mode": "logical", "target": {"database": "copy"}, "confirm": "copy"})).unwrap();
    h.manifest(manifest(false));
    h.request();
    h.rows(&["nodes"], json!([[0]]));
    let create = h.request();
    assert_eq!(
        (create.url.as_str(), statement(&create)),
        ("http://db.test/db/copy/query/v2", h.helper().create_constraint())
    );
    h.rows(&[], json!([]));
    let Io::GraphLoad(order) = h.io() else { panic!("the load comes after the constraint") };
    assert_eq!(order.cursor, LoadCursor::default());
    let (cursor, _) = run_loader(&lines(), 500).unwrap();
    assert!(cursor.import_label, "the scan hands over to a load through the import label");
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(cursor), error: None })));
    let cleanup = h.request();
    assert_eq!(statement(&cleanup), h.helper().cleanup_nodes());
    let body: Value = serde_json::from_slice(cleanup.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["parameters"], json!({"limit": aura::CLEANUP_LIMIT}), "bounded batches");
    h.rows(&["cleaned"], json!([[3]]));
    assert_eq!(statement(&h.request()), h.helper().cleanup_nodes());
    h.rows(&["cleaned"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().cleanup_relationships());
    h.rows(&["cleaned"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().drop_constraint(), "dropped once nothing carries the label");
    h.rows(&[], json!([]));
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Restored, "{:?}", h.job.error);
    assert!(h.job.note.as_deref().unwrap().contains("3 nodes, 1 relationships"));
}

#[test]
fn the_cleanup_removes_the_import_label_with_the_helper_property_in_bounded_batches() {
    assert_eq!(
        aura::CLEANUP_NODES,
        "MATCH (n:`_FerryImport`) WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` RETURN count(n) AS cleaned"
    );
    assert_eq!(
        CREATE_IMPORT_CONSTRAINT,
        "CREATE CONSTRAINT `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) REQUIRE n.`_ferry_id` IS UNIQUE"
    );
    assert_eq!(DROP_IMPORT_CONSTRAINT, "DROP CONSTRAINT `ferry_import_id` IF EXISTS");
}

#[test]
fn a_drill_that_cannot_make_the_constraint_still_empties_drops_and_records() {
    let mut h = H::new(Task::Drill, json!({})).unwrap();
    h.manifest(manifest(true));
    h.request();
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().create_constraint());
    h.answer(202, json!({"errors": [{"code": "Neo.ClientError.Schema.ConstraintCreationFailed", "message": "no"}]}));
    assert_eq!(statement(&h.request()), DELETE_BATCH);
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().drop_constraint());
    h.rows(&[], json!([]));
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    assert!(record["error"].as_str().unwrap().contains("ConstraintCreationFailed"), "{record}");
}

#[test]
fn a_drill_whose_constraint_cannot_be_dropped_records_that_once_instead_of_emptying_again() {
    let mut h = H::new(Task::Drill, json!({})).unwrap();
    h.manifest(manifest(true));
    let (cursor, _) = run_loader(&lines(), 500).unwrap();
    h.request();
    h.rows(&["deleted"], json!([[0]]));
    h.request();
    h.rows(&[], json!([]));
    h.io();
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(cursor), error: None })));
    for _ in 0..2 {
        h.request();
        h.rows(&["cleaned"], json!([[0]]));
    }
    h.request();
    h.rows(&["label", "n"], json!([["P", 2], ["C", 1]]));
    h.request();
    h.rows(&["type", "n"], json!([["K", 1]]));
    h.request();
    h.rows(&["deleted"], json!([[3]]));
    h.request();
    h.rows(&["deleted"], json!([[0]]));
    assert_eq!(statement(&h.request()), h.helper().drop_constraint());
    h.answer(202, json!({"errors": [{"code": "Neo.ClientError.Schema.ConstraintDropFailed", "message": "gone"}]}));
    let Io::Record { record, .. } = h.io() else { panic!("straight to the record, not emptying again") };
    assert_eq!(record["passed"], json!(false));
    let error = record["error"].as_str().unwrap();
    assert!(error.starts_with("dropping the import constraint of the drill database scratch failed"), "{error}");
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
}

#[test]
fn a_load_begun_before_the_import_label_goes_on_with_its_own_statements_and_cleanup() {
    // A cursor persisted mid-load by an earlier Ferry: no `import_label` field.
    let (mut scanned, _) = run_loader(&lines(), 2).unwrap();
    scanned.finished = false;
    scanned.lines_done = 0;
    let mut old = serde_json::to_value(&scanned).unwrap();
    old.as_object_mut().unwrap().remove("import_label");
    let cursor: LoadCursor = serde_json::from_value(old).unwrap();
    assert!(!cursor.import_label);
    let mut loader = GraphLoader::new(cursor, 10);
    for l in lines() {
        loader.line(l.as_bytes()).unwrap();
    }
    let groups = loader.end().unwrap().unwrap();
    assert_eq!(groups[0].statement, aura::legacy_node_statement(&["P".into()]));
    assert_eq!(groups[2].statement, aura::legacy_relationship_statement("K"));
    assert!(!groups[0].statement.contains("_FerryImport"));
    loader.last_chunk_done(&groups);

    // Its cleanup removes `_ferry_id` from every node, as it did.
    let mut h =
        H::new(Task::Restore, json!({"mode": "logical", "target": {"database": "copy"}, "confirm": "copy"})).unwrap();
    h.manifest(manifest(false));
    h.request();
    h.rows(&["nodes"], json!([[0]]));
    h.request();
    h.rows(&[], json!([]));
    h.io();
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(loader.cursor), error: None })));
    assert_eq!(statement(&h.request()), aura::LEGACY_CLEANUP_NODES);
}

// ----- snapshot restores whose status lags the POST ------------------------------------------

fn snapshot_restore_posted(params: Value, post_status: &str) -> H {
    let mut h = H::new(Task::Restore, params).unwrap();
    h.manifest(manifest(true));
    h.token();
    h.request();
    assert!(matches!(h.answer(202, json!({"data": {"status": post_status}})), Action::Sleep(_)));
    h
}

fn poll(h: &mut H, status: &str) -> Action {
    let req = h.request();
    assert_eq!((req.method, req.url.as_str()), (crate::http::Method::Get, "http://aura.test/v1/instances/2f49c2b3"));
    h.answer(200, json!({"data": {"status": status}}))
}

#[test]
fn a_snapshot_restore_whose_status_lags_the_post_is_not_done_at_the_first_running() {
    // Aura answers the POST and still reports `running` before the restore begins.
    let mut h = snapshot_restore_posted(json!({"mode": "snapshot", "confirm": "2f49c2b3"}), "running");
    for _ in 0..2 {
        assert!(matches!(poll(&mut h, "running"), Action::Sleep(_)), "running before restoring is not done");
        assert_eq!(h.job.phase, Phase::Restoring);
    }
    assert!(matches!(poll(&mut h, "restoring"), Action::Sleep(_)));
    poll(&mut h, "running");
    assert!(matches!(h.wake(), Action::Done));
    assert_eq!(h.job.phase, Phase::Restored, "{:?}", h.job.error);
    assert!(!h.job.note.as_deref().unwrap().contains("never reported"), "{:?}", h.job.note);
}

#[test]
fn running_without_restoring_is_taken_as_done_only_after_the_restoring_wait_and_says_so() {
    let params = json!({"mode": "snapshot", "confirm": "2f49c2b3", "restoring_wait_seconds": 35});
    let mut h = snapshot_restore_posted(params, "running");
    let start = h.now;
    while h.job.phase == Phase::Restoring && h.now.since(start) < std::time::Duration::from_secs(120) {
        poll(&mut h, "running");
        if h.job.phase == Phase::Restoring && h.now.since(start) < std::time::Duration::from_secs(35) {
            assert!(h.job.next_step_at.is_some(), "still waiting for restoring");
        }
        if matches!(h.job.restore_state(), Some(RestoreState::Aura(a)) if a.step == aura::Step::Done) {
            h.wake();
        }
    }
    assert_eq!(h.job.phase, Phase::Restored, "{:?}", h.job.error);
    assert!(h.now.since(start) >= std::time::Duration::from_secs(35), "not before the wait");
    assert!(h.job.note.as_deref().unwrap().contains("never reported the instance restoring"), "{:?}", h.job.note);
    let e = H::new(Task::Restore, json!({"mode": "snapshot", "confirm": "2f49c2b3", "restoring_wait_seconds": 0}));
    assert!(e.err().unwrap().contains("restoring_wait_seconds"));
}

// ----- drills into a scratch instance -------------------------------------------------------

const SCRATCH: &str = "5c7a7c11";

fn scratch_source() -> SourceConfig {
    let mut src = source();
    if let crate::providers::ProviderConfig::Aura(cfg) = &mut src.provider {
        cfg.drill_database = None;
        cfg.drill_scratch =
            Some(serde_json::from_value(json!({"memory": "1GB", "create_timeout_minutes": 5})).unwrap());
    }
    src
}

fn scratch_drill() -> H {
    let secrets = [("CID", "id"), ("CSEC", "sec"), ("PW", "pw")];
    let mut h = H(Driver::start(Task::Drill, scratch_source(), &json!({}), None, &secrets, t0()).unwrap());
    h.manifest(manifest(true));
    h.token();
    let read = h.request();
    assert_eq!((read.method, read.url.as_str()), (crate::http::Method::Get, "http://aura.test/v1/instances/2f49c2b3"));
    h.answer(
        200,
        json!({"data": {"id": "2f49c2b3", "status": "running", "tenant_id": "T1", "cloud_provider": "aws",
        "region": "us-east-1", "type": "professional-db", "memory": "8GB", "name": "prod"}}),
    );
    h
}

fn created_answer() -> Value {
    json!({"data": {"id": SCRATCH, "connection_url": format!("neo4j+s://{SCRATCH}.databases.neo4j.io"),
        "username": "neo4j", "password": "generated-pw", "tenant_id": "T1", "cloud_provider": "aws",
        "region": "us-east-1", "type": "professional-db", "name": "ferry-drill-0123456789abcdef"}})
}

fn expect_create(h: &mut H) {
    let create = h.request();
    assert_eq!((create.method, create.url.as_str()), (crate::http::Method::Post, "http://aura.test/v1/instances"));
    let body: Value = serde_json::from_slice(create.body.as_deref().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"version": "5", "region": "us-east-1", "memory": "1GB", "name": "ferry-drill-0123456789abcdef",
            "type": "professional-db", "tenant_id": "T1", "cloud_provider": "aws"}),
        "the source's tenant, region, type and provider; the configured memory"
    );
}

/// From the create answer to the first statement on the scratch instance's Query API.
fn until_running(h: &mut H) {
    assert!(matches!(h.answer(202, created_answer()), Action::Sleep(_)));
    for status in ["creating", "running"] {
        let get = h.request();
        assert_eq!(get.url, format!("http://aura.test/v1/instances/{SCRATCH}"));
        h.answer(200, json!({"data": {"id": SCRATCH, "status": status}}));
    }
}

fn expect_delete(h: &mut H) {
    let del = h.request();
    assert_eq!(
        (del.method, del.url.as_str()),
        (crate::http::Method::Delete, format!("http://aura.test/v1/instances/{SCRATCH}").as_str())
    );
    h.answer(202, json!({"data": {"id": SCRATCH, "status": "destroying"}}));
}

fn basic(user: &str, pw: &str) -> String {
    format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{pw}")))
}

#[test]
fn a_scratch_drill_creates_an_instance_like_the_source_loads_it_counts_and_deletes_it() {
    let mut h = scratch_drill();
    expect_create(&mut h);
    until_running(&mut h);
    let create = h.request();
    assert_eq!(create.url, format!("https://{SCRATCH}.databases.neo4j.io/db/neo4j/query/v2"), "its own Query API");
    assert_eq!(create.header_value("authorization"), Some(basic("neo4j", "generated-pw").as_str()));
    assert_eq!(statement(&create), h.helper().create_constraint(), "a new instance is empty: nothing to delete first");
    h.rows(&[], json!([]));
    let Io::GraphLoad(order) = h.io() else { panic!("expected the load") };
    assert!(order.url.starts_with(&format!("https://{SCRATCH}.")));
    let (cursor, _) = run_loader(&lines(), 500).unwrap();
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(cursor), error: None })));
    for _ in 0..2 {
        h.request();
        h.rows(&["cleaned"], json!([[0]]));
    }
    assert_eq!(statement(&h.request()), LABEL_COUNTS);
    h.rows(&["label", "n"], json!([["P", 2], ["C", 1]]));
    assert_eq!(statement(&h.request()), TYPE_COUNTS);
    h.rows(&["type", "n"], json!([["K", 1]]));
    expect_delete(&mut h);
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    assert_eq!(record["passed"], json!(true), "{record}");
    assert_eq!(record["drill_instance"]["id"], json!(SCRATCH));
    assert_eq!(record["drill_instance"]["deleted"], json!([SCRATCH]));
    assert!(!record.to_string().contains("generated-pw"));
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Restored, "{:?}", h.job.error);
    let note = h.job.note.clone().unwrap();
    assert!(note.contains(&format!("scratch instance {SCRATCH} (ferry-drill-0123456789abcdef, deleted)")), "{note}");
    assert!(!h.job.public_json().to_string().contains("generated-pw"), "the password is never shown");
    assert!(!serde_json::to_string(&h.job).unwrap().contains("generated-pw"), "and forgotten at the end");
}

#[test]
fn a_scratch_drill_that_fails_after_the_create_still_deletes_the_instance_and_records() {
    let mut h = scratch_drill();
    expect_create(&mut h);
    until_running(&mut h);
    h.request();
    h.rows(&[], json!([]));
    h.io();
    let err = StepError::permanent("graph.jsonl.gz has no footer line");
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::default(), error: Some(err) })));
    expect_delete(&mut h);
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    assert_eq!(record["passed"], json!(false));
    assert!(record["error"].as_str().unwrap().contains("no footer"));
    assert_eq!(record["drill_instance"]["deleted"], json!([SCRATCH]));
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
}

#[test]
fn a_scratch_drill_woken_after_a_lost_create_answer_finds_the_instance_by_name_deletes_it_and_creates_again() {
    let mut h = scratch_drill();
    expect_create(&mut h);
    // The runtime dies with the create in flight: the persisted job wakes with no answer.
    let lookup = h.request();
    assert_eq!(
        (lookup.method, lookup.url.as_str()),
        (crate::http::Method::Get, "http://aura.test/v1/instances"),
        "the create is not sent again blindly"
    );
    h.answer(
        200,
        json!({"data": [{"id": "2f49c2b3", "name": "prod", "tenant_id": "T1", "cloud_provider": "aws"},
        {"id": "0dd0dd00", "name": "ferry-drill-0123456789abcdef", "tenant_id": "T1", "cloud_provider": "aws"}]}),
    );
    let del = h.request();
    assert_eq!((del.method, del.url.as_str()), (crate::http::Method::Delete, "http://aura.test/v1/instances/0dd0dd00"));
    h.answer(202, json!({"data": {"id": "0dd0dd00", "status": "destroying"}}));
    let wait = h.request();
    assert_eq!(wait.url, "http://aura.test/v1/instances");
    h.answer(200, json!({"data": [{"id": "0dd0dd00", "name": "ferry-drill-0123456789abcdef"}]}));
    assert_eq!(h.request().url, "http://aura.test/v1/instances", "until it is gone");
    h.answer(200, json!({"data": []}));
    expect_create(&mut h);
    until_running(&mut h);
    let note = serde_json::to_string(&h.job.restore_state()).unwrap();
    assert!(note.contains("found 0dd0dd00 by its name"), "{note}");
}

#[test]
fn a_create_that_gets_a_5xx_is_looked_for_before_it_is_sent_again_and_a_drill_failing_then_cleans_up() {
    let mut h = scratch_drill();
    expect_create(&mut h);
    h.answer(503, json!({"errors": [{"message": "unavailable", "reason": "service-unavailable"}]}));
    let lookup = h.request();
    assert_eq!((lookup.method, lookup.url.as_str()), (crate::http::Method::Get, "http://aura.test/v1/instances"));
    h.answer(200, json!({"data": []}));
    expect_create(&mut h);
    // Refused for good (the tenant's quota): the drill fails in Aura's words and records it.
    h.answer(
        400,
        json!({"errors": [{"message": "Your tenant has reached its limit of 1 instances", "reason": "instance-quota-reached"}]}),
    );
    let lookup = h.request();
    assert_eq!(lookup.url, "http://aura.test/v1/instances", "anything of its name is cleaned up");
    h.answer(200, json!({"data": []}));
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    let error = record["error"].as_str().unwrap();
    assert!(error.contains("creating the drill's scratch instance failed") && error.contains("limit of 1"), "{error}");
    h.feed(Event::RestoreIo(Ok(IoDone::Recorded)));
    h.wake();
    assert_eq!(h.job.phase, Phase::Failed);
}

#[test]
fn a_delete_refused_while_the_scratch_instance_is_busy_is_asked_again() {
    let mut h = scratch_drill();
    expect_create(&mut h);
    assert!(matches!(h.answer(202, created_answer()), Action::Sleep(_)));
    h.request();
    // Still creating when Aura refuses it (stuck): the drill fails and deletes.
    h.answer(200, json!({"data": {"id": SCRATCH, "status": "loading failed"}}));
    let del = h.request();
    assert_eq!(del.method, crate::http::Method::Delete);
    let busy = json!({"errors": [{"message": "The database is current undergoing an operation: creating",
        "reason": "ongoing-database-operation"}]});
    assert!(matches!(h.answer(409, busy), Action::Sleep(_)), "asked again later");
    assert_eq!(h.request().method, crate::http::Method::Delete);
    h.answer(404, json!({"errors": [{"message": "DB not found", "reason": "db-not-found"}]}));
    let Io::Record { record, .. } = h.io() else { panic!("expected the record") };
    assert!(record["error"].as_str().unwrap().contains("\"loading failed\""), "{record}");
    assert_eq!(record["drill_instance"]["deleted"], json!([SCRATCH]));
}

#[test]
fn a_drill_into_a_spare_instance_empties_and_loads_its_database_with_its_own_credentials() {
    let mut src = source();
    if let crate::providers::ProviderConfig::Aura(cfg) = &mut src.provider {
        cfg.drill_database = None;
        cfg.drill_instance = Some("aaaabbbb".into());
        cfg.drill_password_secret = Some("SPW".into());
        cfg.drill_query_api_base = Some(url::Url::parse("http://spare.test").unwrap());
    }
    let secrets = [("CID", "id"), ("CSEC", "sec"), ("PW", "pw"), ("SPW", "spare-pw")];
    let mut h = H(Driver::start(Task::Drill, src, &json!({}), None, &secrets, t0()).unwrap());
    h.manifest(manifest(true));
    let del = h.request();
    assert_eq!((del.url.as_str(), statement(&del)), ("http://spare.test/db/neo4j/query/v2", DELETE_BATCH.to_string()));
    assert_eq!(del.header_value("authorization"), Some(basic("neo4j", "spare-pw").as_str()));
}

// ----- typed values and the load's own helper property ----------------------------------------

fn typed_lines() -> Vec<String> {
    let date = json!({"$type": "Date", "_value": "2015-03-26"});
    let point = json!({"$type": "Point", "_value": "SRID=4979;POINT Z (1.0 2.0 3.0)"});
    let own = json!({"$type": "String", "_value": "the source's own"});
    vec![
        json!({"type": "header", "format": "ferry-neo4j-jsonl", "version": 2, "values": "typed-json"}).to_string(),
        json!({"type": "node", "id": "4:x:0", "labels": ["P"], "properties": {"d": date, "_ferry_id": own}})
            .to_string(),
        json!({"type": "node", "id": "4:x:1", "labels": [], "properties": {}}).to_string(),
        json!({"type": "relationship", "id": "5:x:0", "rel_type": "K", "start": "4:x:0", "end": "4:x:1",
               "properties": {"at": point}})
        .to_string(),
        json!({"type": "footer", "nodes": 2, "relationships": 1}).to_string(),
    ]
}

/// Scans then loads `file` keyed by `helper`; the chunk's statements.
fn load_all(file: &[String], helper: &aura::Helper) -> Result<Vec<aura::Group>, StepError> {
    let mut scan = GraphLoader::new(LoadCursor::default(), 10).with_helper(helper.clone());
    for l in file {
        scan.line(l.as_bytes())?;
    }
    scan.end()?;
    let mut loader = GraphLoader::new(scan.cursor, 10).with_helper(helper.clone());
    for l in file {
        loader.line(l.as_bytes())?;
    }
    Ok(loader.end()?.unwrap_or_default())
}

#[test]
fn a_version_2_file_is_loaded_with_typed_rows_in_typed_json_requests() {
    let helper = aura::Helper::for_job(&JobId::new("0123456789abcdef"));
    let groups = load_all(&typed_lines(), &helper).unwrap();
    assert!(groups.iter().all(|g| g.typed));
    assert_eq!(
        groups[0].rows[0],
        json!({"$type": "Map", "_value": {
            "id": {"$type": "String", "_value": "4:x:0"},
            "props": {"$type": "Map", "_value": {"d": {"$type": "Date", "_value": "2015-03-26"},
                                                  "_ferry_id": {"$type": "String", "_value": "the source's own"}}}}}),
        "the file's typed values go out as they are, the source's _ferry_id among them"
    );
    assert_eq!(groups[2].rows[0]["_value"]["start"], json!({"$type": "String", "_value": "4:x:0"}));
    let req = aura::load_request("http://db.test/db/copy/query/v2", &Secret::new("Basic x"), &groups[0]);
    assert_eq!(req.header_value("content-type"), Some("application/vnd.neo4j.query"));
    let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["parameters"]["rows"]["$type"], "List", "every parameter typed");
    assert_eq!(body["parameters"]["rows"]["_value"][0], groups[0].rows[0]);
    assert_eq!(body["statement"], helper.node_statement(&["P".into()]));
    assert!(body["statement"].as_str().unwrap().contains("`_ferry_0123456789abcdef`: row.id"));
}

#[test]
fn a_version_1_file_still_loads_as_plain_json() {
    let groups = load_all(&lines(), &aura::Helper::legacy()).unwrap();
    assert!(groups.iter().all(|g| !g.typed));
    assert_eq!(groups[0].rows[0], json!({"id": "a", "props": {"x": 1}}));
    let req = aura::load_request("http://db.test/db/copy/query/v2", &Secret::new("Basic x"), &groups[0]);
    assert_eq!(req.header_value("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["parameters"]["rows"], json!([{"id": "a", "props": {"x": 1}}, {"id": "c", "props": {}}]));
}

#[test]
fn a_file_with_a_property_named_like_the_helper_or_of_an_unknown_version_is_refused_by_the_scan() {
    let helper = aura::Helper::for_job(&JobId::new("0123456789abcdef"));
    let mut file = typed_lines();
    file[3] = file[3].replace("\"at\"", "\"_ferry_0123456789abcdef\"");
    let e = load_all(&file, &helper).unwrap_err();
    assert!(e.message().contains("line 4: a property named \"_ferry_0123456789abcdef\""), "{}", e.message());
    // With the legacy helper, a source `_ferry_id` is refused before loading, not overwritten.
    let e = load_all(&typed_lines(), &aura::Helper::legacy()).unwrap_err();
    assert!(e.message().contains("\"_ferry_id\", the helper property"), "{}", e.message());
    let mut newer = typed_lines();
    newer[0] = json!({"type": "header", "format": "ferry-neo4j-jsonl", "version": 3}).to_string();
    assert!(load_all(&newer, &helper).unwrap_err().message().contains("format version 3"));
    let mut untyped = typed_lines();
    untyped[2] = json!({"type": "node", "id": "4:x:1", "labels": [], "properties": {"d": "2015-03-26"}}).to_string();
    assert!(load_all(&untyped, &helper).unwrap_err().message().contains("not typed JSON"));
}

#[test]
fn a_load_keys_elements_by_a_helper_named_after_its_job_from_constraint_to_cleanup() {
    let mut h =
        H::new(Task::Restore, json!({"mode": "logical", "target": {"database": "copy"}, "confirm": "copy"})).unwrap();
    let helper = aura::Helper::for_job(&h.job.id);
    assert_eq!(helper.property, format!("_ferry_{}", h.job.id));
    h.manifest(manifest(false));
    h.request();
    h.rows(&["nodes"], json!([[0]]));
    let create = statement(&h.request());
    assert_eq!(
        create,
        format!(
            "CREATE CONSTRAINT `ferry_import_{0}` IF NOT EXISTS FOR (n:`_FerryImport`) REQUIRE n.`_ferry_{0}` IS UNIQUE",
            h.job.id
        )
    );
    h.rows(&[], json!([]));
    let Io::GraphLoad(order) = h.io() else { panic!("the load") };
    assert_eq!(order.helper, helper, "the runtime's loader keys by the job's helper");
    let (cursor, _) = run_loader(&lines(), 500).unwrap();
    h.feed(Event::RestoreIo(Ok(IoDone::GraphLoaded { cursor: Box::new(cursor), error: None })));
    assert!(statement(&h.request()).contains(&format!("n.`_ferry_{}`", h.job.id)));
    h.rows(&["cleaned"], json!([[0]]));
    assert!(statement(&h.request()).contains(&format!("r.`_ferry_{}`", h.job.id)));
    h.rows(&["cleaned"], json!([[0]]));
    assert_eq!(statement(&h.request()), format!("DROP CONSTRAINT `ferry_import_{}` IF EXISTS", h.job.id));
}

#[test]
fn a_restore_planned_before_job_helpers_goes_on_with_ferry_id() {
    let state = plan(
        Task::Restore,
        &source(),
        &json!({"mode": "logical", "target": {"database": "copy"}, "confirm": "copy"}),
        Some(format!("{FOLDER}manifest.json")),
    )
    .unwrap();
    let RestoreState::Aura(state) = state else { panic!("an Aura restore") };
    let mut old = serde_json::to_value(&state).unwrap();
    old.as_object_mut().unwrap().remove("job_helper");
    let old: aura::AuraRestore = serde_json::from_value(old).unwrap();
    assert_eq!(old.helper(&JobId::new("0123456789abcdef")), aura::Helper::legacy());
    assert_eq!(state.helper(&JobId::new("0123456789abcdef")).property, "_ferry_0123456789abcdef");
}

// ----- drills of typed backups: values and types compared ---------------------------------------

fn ty(kind: &str, value: &str) -> Value {
    json!({"$type": kind, "_value": value})
}

/// A version 2 (typed) file: Ada was born on a date.
fn drill_lines() -> Vec<String> {
    vec![
        json!({"type": "header", "format": "ferry-neo4j-jsonl", "version": 2, "values": "typed-json"}).to_string(),
        json!({"type": "node", "id": "4:x:0", "labels": ["P"],
               "properties": {"name": ty("String", "Ada"), "born": ty("Date", "1815-12-10")}})
        .to_string(),
        json!({"type": "node", "id": "4:x:1", "labels": ["P"], "properties": {"name": ty("String", "Bo")}}).to_string(),
        json!({"type": "relationship", "id": "5:x:0", "rel_type": "K", "start": "4:x:0", "end": "4:x:1",
               "properties": {"since": ty("Integer", "7")}})
        .to_string(),
        json!({"type": "footer", "nodes": 2, "relationships": 1}).to_string(),
    ]
}

/// The digests of `drill_lines()`, as the export records them in the manifest.
fn typed_manifest() -> Manifest {
    let (cursor, _) = run_loader(&drill_lines(), 500).unwrap();
    let values = cursor.values.clone().expect("a typed file's scan keeps the digests");
    let mut m = manifest(false);
    m.artifacts[0].details = Some(json!({"format": "ferry-neo4j-jsonl", "nodes": 2, "relationships": 1,
        "labels": {"P": 2}, "types": {"K": 1}, "values": values}));
    m
}

/// Runs a drill of `m` whose load read `drill_lines()` and whose database holds `born` (for Ada)
/// when read back; returns the record, the job's error and the read-back requests' statements.
fn typed_drill(m: Manifest, born: Value) -> (Value, Option<String>, Vec<String>) {
    let mut h = loaded_drill(m, &drill_lines(), json!({"batch_size": 1}));
    assert_eq!(statement(&h.request()), LABEL_COUNTS);
    h.rows(&["label", "n"], json!([["P", 2]]));
    assert_eq!(statement(&h.request()), TYPE_COUNTS);
    h.rows(&["type", "n"], json!([["K", 1]]));
    let mut read = Vec::new();
    let typed_rows = |h: &mut H, fields: &[&str], rows: Value| {
        h.answer(200, json!({"data": {"fields": fields, "values": rows}}));
    };
    let int = |n: &str| ty("Integer", n);
    let list = |items: Vec<Value>| json!({"$type": "List", "_value": items});
    let map = |v: Value| json!({"$type": "Map", "_value": v});
    // Nodes: the highest id, then one page per id (batch_size 1), in typed JSON.
    let answers = [
        (vec!["max"], json!([[int("1")]])),
        (
            vec!["id", "labels", "props"],
            json!([[
                ty("String", "4:y:0"),
                list(vec![ty("String", "P")]),
                map(json!({"name": ty("String", "Ada"), "born": born}))
            ]]),
        ),
        (
            vec!["id", "labels", "props"],
            json!([[ty("String", "4:y:1"), list(vec![ty("String", "P")]), map(json!({"name": ty("String", "Bo")}))]]),
        ),
        (vec!["max"], json!([[int("0")]])),
        (
            vec!["id", "type", "start", "end", "props"],
            json!([[
                ty("String", "5:y:0"),
                ty("String", "K"),
                ty("String", "4:y:0"),
                ty("String", "4:y:1"),
                map(json!({"since": ty("Integer", "7")}))
            ]]),
        ),
    ];
    for (fields, rows) in answers {
        let req = h.request();
        assert_eq!(req.header_value("accept"), Some("application/vnd.neo4j.query"), "read back in typed JSON");
        read.push(statement(&req));
        typed_rows(&mut h, &fields, rows);
    }
    let (record, error) = finish_drill(&mut h);
    (record, error, read)
}

#[test]
fn a_drill_of_a_typed_backup_reads_the_graph_back_page_by_page_and_passes_when_every_value_and_type_matches() {
    let (record, error, read) = typed_drill(typed_manifest(), ty("Date", "1815-12-10"));
    assert_eq!(error, None);
    assert_eq!((record["passed"].clone(), record["values_compared"].clone()), (json!(true), json!(true)));
    assert_eq!(record["backup_values_from"], json!("manifest"));
    assert_eq!(
        read,
        [
            crate::providers::aura::MAX_NODE_ID,
            crate::providers::aura::NODES_QUERY,
            crate::providers::aura::NODES_QUERY,
            crate::providers::aura::MAX_RELATIONSHIP_ID,
            crate::providers::aura::RELATIONSHIPS_QUERY,
        ],
        "id seeks, a page of batch_size ids at a time"
    );
}

#[test]
fn a_drill_whose_restored_value_changed_type_fails_naming_the_label_and_property() {
    // The backup recorded a Date; the graph loaded from R2 holds a String (the file was altered,
    // its counts and footer still matching).
    let (record, error, _) = typed_drill(typed_manifest(), ty("String", "1815-12-10"));
    let error = error.expect("the drill fails");
    assert!(error.contains("label \"P\"") && error.contains("(property \"born\")"), "{error}");
    assert!(!error.contains("type \"K\""), "{error}");
    assert_eq!(record["passed"], json!(false));
    assert_eq!(record["values_compared"], json!(true));
}
