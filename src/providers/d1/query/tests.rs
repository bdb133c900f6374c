use super::*;
use crate::transfer::Generator;

fn obj(kind: &str, name: &str, tbl: &str, sql: Option<&str>) -> SchemaObject {
    SchemaObject { kind: kind.into(), name: name.into(), tbl_name: tbl.into(), sql: sql.map(str::to_string) }
}

fn now() -> Timestamp {
    Timestamp::from_secs(1_000)
}

fn answer(rows: Value) -> HttpResponse {
    HttpResponse::json(200, &json!({"success": true, "errors": [], "result": [{"results": rows, "success": true}]}))
}

fn sql_of(req: &HttpRequest) -> String {
    let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
    body["sql"].as_str().unwrap().to_string()
}

fn hostile_plan() -> QueryPlan {
    let objects = vec![
        obj("table", "articles", "articles", Some("CREATE TABLE articles (id INTEGER PRIMARY KEY, body TEXT)")),
        obj("table", "notes", "notes", Some("CREATE VIRTUAL TABLE notes USING fts5(title, body)")),
        obj(
            "table",
            "articles_fts",
            "articles_fts",
            Some("CREATE VIRTUAL TABLE articles_fts USING fts5(body, content='articles', content_rowid='id')"),
        ),
        obj("table", "notes_data", "notes_data", Some("CREATE TABLE 'notes_data'(id INTEGER PRIMARY KEY, block BLOB)")),
        obj("table", "nums", "nums", Some("CREATE TABLE nums (v INTEGER, w)")),
    ];
    let shadows: BTreeSet<String> = ["notes_data".to_string()].into();
    let mut plan = plan(&objects, &shadows, &DumpOptions::default());
    plan.scan[1].big.insert("v".into(), 2);
    plan
}

fn export(plan: &QueryPlan, page_rows: u32) -> QueryExport {
    QueryExport::new("http://d1/query".into(), "Bearer t".into(), plan, page_rows)
}

/// Plays the writer against canned answers, one slice per answer when `sliced`; returns the file.
fn run(spec: &QueryExport, answers: &[Value], sliced: bool) -> (String, Value, Vec<String>) {
    let mut out = Vec::new();
    let mut sent = Vec::new();
    let mut cursor: Option<QueryCursor> = None;
    let mut writer = spec.resume(None);
    for a in answers {
        let req = writer.next_request().expect("a request for every answer");
        sent.push(sql_of(&req));
        writer.on_response(&answer(a.clone()), now()).unwrap();
        out.extend(writer.take_output());
        if sliced {
            let (rest, c) = writer.end_slice();
            out.extend(rest);
            cursor = Some(c);
            writer = spec.resume(cursor.as_ref());
        }
    }
    assert!(writer.next_request().is_none(), "every page was read: {sent:?}");
    let (rest, details) = writer.finish();
    out.extend(rest);
    let _ = cursor;
    (String::from_utf8(out).unwrap(), details, sent)
}

fn hostile_answers() -> Vec<Value> {
    vec![
        // notes: its columns, then one full page of 2 rows and a short one.
        json!([{"cid": 0, "name": "title"}, {"cid": 1, "name": "body"}]),
        json!([{"r": "1", "v0": "'a'", "v1": "'it''s'"}, {"r": "2", "v0": "NULL", "v1": "X'00ff'"}]),
        json!([{"r": "9223372036854775807", "v0": "'last\nline'", "v1": "1.5"}]),
        // nums.v: windows of two rows (hits and each window's last row), then an empty one.
        json!([{"r": "3", "k": 3, "n": 1, "v0": "9007199254740993"}, {"r": "4", "k": 4, "n": 2, "v0": "-9007199254740993"}]),
        json!([{"r": "7", "k": 7, "n": 1, "v0": null}, {"r": "12", "k": 12, "n": 2, "v0": "9223372036854775807"}]),
        json!([]),
    ]
}

#[test]
fn the_plan_sends_virtual_tables_through_the_query_api_and_scans_the_ordinary_ones() {
    let plan = hostile_plan();
    assert_eq!(
        plan.virtual_tables.iter().map(|v| (v.name.as_str(), v.content)).collect::<Vec<_>>(),
        [("notes", Content::Rows), ("articles_fts", Content::External)]
    );
    assert_eq!(plan.dump_tables, ["articles", "nums"]);
    assert_eq!(plan.scan.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["articles", "nums"]);
    assert!(plan.export);
}

#[test]
fn fts5_content_options_are_read_whatever_their_quoting() {
    assert_eq!(content_of("CREATE VIRTUAL TABLE t USING fts5(a, b)"), Content::Rows);
    assert_eq!(content_of("create virtual table t using FTS5(a, content=\"src\")"), Content::External);
    assert_eq!(content_of("CREATE VIRTUAL TABLE t USING fts5(a, content = '')"), Content::Contentless);
    assert_eq!(
        content_of("CREATE VIRTUAL TABLE t USING fts5(a, tokenize='porter ascii', prefix='2 3')"),
        Content::Rows
    );
    assert_eq!(content_of("CREATE VIRTUAL TABLE t USING rtree(id, minx, maxx)"), Content::Rows);
}

#[test]
fn a_contentless_table_and_a_without_rowid_table_are_named_in_the_notes() {
    let objects = vec![
        obj("table", "c", "c", Some("CREATE VIRTUAL TABLE c USING fts5(a, content='')")),
        obj("table", "w", "w", Some("CREATE TABLE w (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")),
    ];
    let plan = plan(&objects, &BTreeSet::new(), &DumpOptions::default());
    assert!(plan.notes.iter().any(|n| n.contains("virtual table c is a contentless FTS5 table")), "{:?}", plan.notes);
    assert!(plan.notes.iter().any(|n| n.contains("table w is WITHOUT ROWID")), "{:?}", plan.notes);
    assert!(plan.scan.is_empty());
}

#[test]
fn the_query_artifact_recreates_virtual_tables_with_their_rows_and_patches_exact_integers() {
    let spec = export(&hostile_plan(), 2);
    let (file, details, sent) = run(&spec, &hostile_answers(), false);
    assert_eq!(sent[0], "PRAGMA table_info(\"notes\")");
    assert!(sent[1].ends_with("FROM \"notes\" ORDER BY rowid LIMIT 2"), "{}", sent[1]);
    assert!(sent[2].contains("FROM \"notes\" WHERE rowid > 2 ORDER BY rowid LIMIT 2"), "{}", sent[2]);
    assert!(sent[4].contains("WHERE rowid > 4"), "{}", sent[4]);
    assert!(sent[5].contains("WHERE rowid > 12"), "{}", sent[5]);
    let body: Vec<&str> = file.lines().filter(|l| !l.starts_with("--")).collect();
    assert_eq!(
        body,
        [
            "CREATE VIRTUAL TABLE notes USING fts5(title, body);",
            "INSERT INTO \"notes\"(rowid, \"title\", \"body\") VALUES(1, 'a', 'it''s');",
            "INSERT INTO \"notes\"(rowid, \"title\", \"body\") VALUES(2, NULL, X'00ff');",
            "INSERT INTO \"notes\"(rowid, \"title\", \"body\") VALUES(9223372036854775807, 'last",
            "line', 1.5);",
            "CREATE VIRTUAL TABLE articles_fts USING fts5(body, content='articles', content_rowid='id');",
            "INSERT INTO \"articles_fts\"(\"articles_fts\") VALUES('rebuild');",
            // nums has no rowid column: the dump carries no rowid, so the restored rows are 1, 2, 3, …
            "UPDATE \"nums\" SET \"v\" = 9007199254740993 WHERE rowid = 1;",
            "UPDATE \"nums\" SET \"v\" = -9007199254740993 WHERE rowid = 2;",
            "UPDATE \"nums\" SET \"v\" = 9223372036854775807 WHERE rowid = 4;",
        ]
    );
    assert_eq!(details["role"], ROLE);
    assert_eq!(details["statements"], 9);
    assert_eq!(details["virtual_tables"][0], json!({"name": "notes", "content": "rows", "rows": 3}));
    assert_eq!(details["exact_integers"], json!({"nums.v": 3}));
    assert!(details["warnings"][0].as_str().unwrap().contains("integers beyond 2^53 in nums.v"));
}

#[test]
fn a_copy_resumed_from_its_cursor_after_every_page_writes_the_same_file() {
    let spec = export(&hostile_plan(), 2);
    let whole = run(&spec, &hostile_answers(), false);
    let sliced = run(&spec, &hostile_answers(), true);
    assert_eq!(whole.0, sliced.0);
    assert_eq!(whole.1, sliced.1);
}

#[test]
fn a_table_whose_rowid_is_a_column_is_patched_by_its_rowid() {
    let mut plan = hostile_plan();
    plan.virtual_tables.clear();
    plan.scan[1].rowid_alias = true;
    let (file, ..) = run(&export(&plan, 2), &hostile_answers()[3..], false);
    assert!(file.contains("UPDATE \"nums\" SET \"v\" = 9007199254740993 WHERE rowid = 3;"), "{file}");
    assert!(file.contains("WHERE rowid = 12;"), "{file}");
    let info = |pk: i64, ty: &str| json!({"name": "id", "type": ty, "pk": pk}).as_object().unwrap().clone();
    assert!(rowid_alias(&[info(1, "integer"), info(0, "TEXT")]));
    assert!(!rowid_alias(&[info(1, "INT")]), "only INTEGER PRIMARY KEY is the rowid");
    assert!(!rowid_alias(&[info(1, "INTEGER"), info(2, "INTEGER")]), "a composite key is not");
}

#[test]
fn an_answer_that_is_not_an_sql_literal_is_refused() {
    let spec = export(&hostile_plan(), 2);
    let mut w = spec.resume(None);
    w.on_response(&answer(json!([{"name": "title"}, {"name": "body"}])), now()).unwrap();
    let evil = answer(json!([{"r": "1", "v0": "1); DROP TABLE articles; --", "v1": "NULL"}]));
    let err = w.on_response(&evil, now()).unwrap_err();
    assert!(err.message().contains("not an SQL literal"), "{}", err.message());
    for ok in ["NULL", "-12", "1.5e+300", "'x''y'", "X'AbCd'", "''"] {
        assert!(is_literal(ok), "{ok}");
    }
    for bad in ["'a'b'", "X'abc'", "abs(1)", "1;", "", "'unterminated"] {
        assert!(!is_literal(bad), "{bad}");
    }
}

#[test]
fn scan_windows_advance_by_the_last_rowid_and_end_on_a_short_window() {
    let mut plan = hostile_plan();
    plan.scan[1].big.clear();
    plan.scan_at = 1;
    plan.scan[1].columns = Some(vec!["v".into(), "w".into()]);
    let sql = scan_sql("nums", &["v".into(), "w".into()], None, 10);
    assert!(
        sql.contains(
            "max((typeof(\"v\")='integer' AND (\"v\" > 9007199254740992 OR \"v\" < -9007199254740992))) AS f0"
        ),
        "{sql}"
    );
    assert!(sql.ends_with("FROM \"nums\" ORDER BY rowid LIMIT 10)"), "{sql}");
    on_scan(&mut plan, &[json!({"n": 10, "last": "-5", "f0": 1, "f1": 0}).as_object().unwrap().clone()], 10).unwrap();
    assert_eq!((plan.scan_at, plan.scan_after.as_deref()), (1, Some("-5")));
    on_scan(&mut plan, &[json!({"n": 3, "last": "40", "f0": 0, "f1": 1}).as_object().unwrap().clone()], 10).unwrap();
    assert_eq!((plan.scan_at, plan.scan_after.as_deref()), (2, None));
    assert_eq!(plan.big_columns(), [("nums.v".to_string(), 1), ("nums.w".to_string(), 1)].into_iter().collect());
    assert!(plan.scanned());
    let err = on_scan(&mut plan.clone(), &[], 10);
    assert!(err.is_ok(), "past the last table nothing is read");
}

#[test]
fn a_page_over_the_response_cap_is_asked_again_smaller() {
    let spec = export(&hostile_plan(), 4);
    let mut w = spec.resume(None);
    assert_eq!(w.shrink_page("too large").unwrap(), 2);
    let (_, cursor) = w.end_slice();
    assert_eq!(cursor.page_rows, Some(2));
    let mut w = spec.resume(Some(&cursor));
    w.on_response(&answer(json!([{"name": "title"}])), now()).unwrap();
    assert!(sql_of(&w.next_request().unwrap()).ends_with("LIMIT 2"));
    assert_eq!(w.shrink_page("x").unwrap(), 1);
    assert!(w.shrink_page("x").is_err());
}

#[test]
fn the_artifact_records_what_a_drill_reads_back_and_the_same_answers_give_the_same_prints() {
    let spec = export(&hostile_plan(), 2);
    let (_, details, _) = run(&spec, &hostile_answers(), true);
    let checks: Vec<DrillCheck> = serde_json::from_value(details["drill_checks"].clone()).unwrap();
    assert_eq!(
        checks.iter().map(|c| (c.table.as_str(), c.kind)).collect::<Vec<_>>(),
        [("notes", CheckKind::Rows), ("nums", CheckKind::Exact)]
    );
    assert_eq!(checks[0].columns, ["title", "body"]);
    assert_eq!((checks[0].prints[0].count, checks[1].prints[0].count), (3, 3));
    assert!(details["drill_checks"][0]["prints"][0]["fnv64"].as_str().unwrap().len() == 16, "hex, not a number");
    // The drill asks the restored database the same questions, in pages of its own size.
    let answers = hostile_answers();
    let mut notes = CheckProgress::default();
    assert!(checks[0].next_sql(&notes, 2).ends_with("FROM \"notes\" ORDER BY rowid LIMIT 2"));
    let rows = |v: &Value| v.as_array().unwrap().iter().map(|r| r.as_object().unwrap().clone()).collect::<Vec<_>>();
    assert!(!checks[0].fold(&mut notes, &rows(&answers[1]), 2).unwrap());
    assert!(checks[0].next_sql(&notes, 2).contains("WHERE rowid > 2"));
    assert!(checks[0].fold(&mut notes, &rows(&answers[2]), 2).unwrap());
    assert!(checks[0].finding(&notes.prints).is_empty());
    let mut nums = CheckProgress::default();
    for a in &answers[3..] {
        checks[1].fold(&mut nums, &rows(a), 2).unwrap();
    }
    assert!(checks[1].finding(&nums.prints).is_empty());
    // One value other than the backup's is named by table and column.
    let mut changed = CheckProgress::default();
    let mut wrong = answers[4].clone();
    wrong[1]["v0"] = json!("9223372036854775806");
    for a in [&answers[3], &wrong, &answers[5]] {
        checks[1].fold(&mut changed, &rows(a), 2).unwrap();
    }
    assert_eq!(
        checks[1].finding(&changed.prints),
        ["table \"nums\" column \"v\": 3 integers beyond 2^53 restored, 3 in the backup, with other values"]
    );
}

#[test]
fn an_integer_primary_key_beyond_2_53_is_named_in_the_notes_by_table_and_column() {
    let info =
        |rows: Value| rows.as_array().unwrap().iter().map(|r| r.as_object().unwrap().clone()).collect::<Vec<_>>();
    let keyed = info(json!([{"name": "id", "type": "INTEGER", "pk": 1}, {"name": "v", "type": "", "pk": 0}]));
    assert_eq!(rowid_key(&keyed).as_deref(), Some("id"));
    assert_eq!(rowid_key(&info(json!([{"name": "k", "type": "TEXT", "pk": 1}]))), None);
    let mut plan = hostile_plan();
    plan.scan[1].big.clear();
    plan.scan_at = 1;
    plan.scan[1].columns = Some(vec!["id".into(), "v".into()]);
    plan.scan[1].key = Some("id".into());
    on_scan(
        &mut plan,
        &[json!({"n": 1, "last": "9007199254740993", "f0": 1, "f1": 0}).as_object().unwrap().clone()],
        10,
    )
    .unwrap();
    assert!(
        plan.notes
            .iter()
            .any(|n| n.starts_with("table nums column id: its INTEGER PRIMARY KEY holds integers beyond 2^53")),
        "{:?}",
        plan.notes
    );
}
