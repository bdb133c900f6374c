//! The dump rewriter: statement ends, oversized INSERTs, held-back schema, replace, staging.

use proptest::prelude::*;

use super::*;

fn rewrite(dump: &str, replace: bool) -> Vec<String> {
    let mut state = RewriteState::new(replace);
    let mut out = Vec::new();
    for _pass in 0..2 {
        let mut rest = dump.as_bytes();
        while !rest.is_empty() {
            let end = statement_end(rest).unwrap_or(rest.len());
            state.statement(std::str::from_utf8(&rest[..end]).unwrap(), &mut out).unwrap();
            rest = &rest[end..];
        }
        state.start_second_pass();
    }
    state.finish(&mut out);
    String::from_utf8(out).unwrap().lines().map(str::to_string).collect()
}

/// What the helper table holds for column `n` once the pieces are applied: the concatenation of
/// the literals' contents, as SQLite's `||` would give it.
fn assembled(lines: &[String], n: usize) -> String {
    let insert = format!("INSERT INTO \"{PIECES}\" (n, v) VALUES({n}, ");
    let update = "UPDATE \"_ferry_restore_pieces\" SET v = v || ";
    let mut v = String::new();
    for line in lines {
        let lit = if let Some(rest) = line.strip_prefix(&insert) {
            v.clear();
            rest.strip_suffix(");").unwrap()
        } else if let Some(lit) = line.strip_prefix(update).and_then(|r| r.strip_suffix(&format!(" WHERE n = {n};"))) {
            lit
        } else {
            continue;
        };
        if let Some(hex) = lit.strip_prefix("X'") {
            v.push_str(hex.strip_suffix('\'').unwrap());
        } else {
            v.push_str(&lit[1..lit.len() - 1]);
        }
    }
    v
}

#[test]
fn a_statement_ends_at_a_semicolon_outside_quotes_comments_and_trigger_bodies() {
    assert_eq!(statement_end(b"INSERT INTO t VALUES('a;b');\nX"), Some(28));
    assert_eq!(statement_end(b"SELECT \"x;\" -- ;\n, [y;] /* ; */ ;"), Some(33));
    let trigger = "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = CASE WHEN 1 THEN 2 END; \
                   DELETE FROM u; END;";
    assert_eq!(statement_end(trigger.as_bytes()), Some(trigger.len()));
    let temp = "create temp trigger tr instead of insert on v begin select 1; end;next";
    assert_eq!(statement_end(temp.as_bytes()), Some(temp.len() - 4));
    assert_eq!(statement_end(b"INSERT INTO t VALUES('unterminated;"), None);
    assert_eq!(statement_end(b"CREATE TABLE \"trigger\"(a);"), Some(26), "a quoted name is not the keyword");
}

#[test]
fn a_dump_under_the_limit_passes_through_with_foreign_keys_deferred_first() {
    let dump = "PRAGMA defer_foreign_keys=TRUE;\nCREATE TABLE t(a);\nINSERT INTO \"t\" (\"a\") VALUES(1);";
    assert_eq!(
        rewrite(dump, false),
        ["PRAGMA defer_foreign_keys=TRUE;", "CREATE TABLE t(a);", "INSERT INTO \"t\" (\"a\") VALUES(1);"]
    );
    assert_eq!(rewrite("", false), ["PRAGMA defer_foreign_keys=TRUE;"]);
}

#[test]
fn a_long_text_is_built_in_pieces_under_the_limit_and_read_back_whole() {
    let text: String = "it''s é ".repeat(40_000); // 360,000 bytes with doubled quotes and 2-byte chars
    let dump = format!("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT, n);\nINSERT INTO \"t\" (\"id\",\"body\",\"n\") VALUES(7,'{text}',3);");
    let lines = rewrite(&dump, false);
    assert!(lines.iter().all(|l| l.len() <= MAX_STATEMENT), "every statement fits");
    assert!(assembled(&lines, 1) == text, "the pieces concatenate to the value");
    assert!(lines.contains(&format!("CREATE TABLE IF NOT EXISTS \"{PIECES}\" (n INTEGER PRIMARY KEY, v);")));
    assert!(lines.contains(&format!(
        "INSERT INTO \"t\" (\"id\",\"body\",\"n\") VALUES(7,(SELECT v FROM \"{PIECES}\" WHERE n = 1),3);"
    )));
    let insert_at = lines.iter().position(|l| l.starts_with("INSERT INTO \"t\"")).unwrap();
    assert_eq!(lines[insert_at + 1], format!("DELETE FROM \"{PIECES}\";"));
    assert_eq!(lines.last().unwrap(), &format!("DROP TABLE IF EXISTS \"{PIECES}\";"));
    // Every piece is a complete literal: an even number of quotes inside.
    for l in lines.iter().filter(|l| l.contains("SET v = v ||")) {
        let lit = l.split("v || ").nth(1).unwrap();
        assert_eq!(lit.matches('\'').count() % 2, 0, "{}", &lit[..40]);
    }
}

#[test]
fn a_long_blob_is_built_from_hex_pieces_and_read_back_as_a_blob() {
    let hex = "00ff".repeat(60_000);
    let dump = format!("INSERT INTO \"b\" (\"k\",\"data\") VALUES('key',X'{hex}');");
    let lines = rewrite(&dump, false);
    assert!(lines.iter().all(|l| l.len() <= MAX_STATEMENT));
    assert!(assembled(&lines, 1) == hex, "the hex pieces concatenate to the value");
    assert!(lines.iter().all(|l| !l.contains("X'") || l.matches("X'").count() == 1));
    assert!(lines.iter().filter(|l| l.contains("X'")).all(|l| {
        let h = l.split("X'").nth(1).unwrap().split('\'').next().unwrap();
        h.len() % 2 == 0
    }));
    assert!(lines.contains(&format!(
        "INSERT INTO \"b\" (\"k\",\"data\") VALUES('key',(SELECT CAST(v AS BLOB) FROM \"{PIECES}\" WHERE n = 1));"
    )));
}

#[test]
fn a_text_with_d1s_newline_wrapper_gets_the_wrapper_around_the_assembled_value() {
    let inner = "line\\nnext\\r".repeat(20_000);
    let value = format!("replace(replace('{inner}','\\r',char(13)),'\\n',char(10))");
    let dump = format!("INSERT INTO \"t\" (\"a\") VALUES({value});");
    let lines = rewrite(&dump, false);
    assert!(lines.iter().all(|l| l.len() <= MAX_STATEMENT));
    assert!(assembled(&lines, 0) == inner, "the pieces concatenate to the wrapped text");
    assert!(lines.contains(&format!(
        "INSERT INTO \"t\" (\"a\") VALUES((SELECT replace(replace(v,'\\r',char(13)),'\\n',char(10)) FROM \"{PIECES}\" WHERE n = 0));"
    )));
}

#[test]
fn several_long_values_in_one_row_each_get_their_own_slot() {
    let a = "a".repeat(120_000);
    let b = "b".repeat(120_000);
    let c = "c".repeat(50_000);
    let dump = format!("INSERT INTO \"t\" (\"x\",\"y\",\"z\",\"w\") VALUES('{a}',NULL,'{b}','{c}');");
    let lines = rewrite(&dump, false);
    assert!(lines.iter().all(|l| l.len() <= MAX_STATEMENT));
    assert!(assembled(&lines, 0) == a && assembled(&lines, 2) == b, "both long values are assembled");
    let insert = lines.iter().find(|l| l.starts_with("INSERT INTO \"t\"")).unwrap();
    assert!(
        insert.contains(&format!(",NULL,(SELECT v FROM \"{PIECES}\" WHERE n = 2),'{c}');")),
        "a value that fits stays inline"
    );
}

#[test]
fn an_oversized_statement_that_cannot_be_split_is_refused_naming_its_table() {
    let numbers = vec!["1"; 60_000].join(",");
    let mut state = RewriteState::new(false);
    let err = state.statement(&format!("CREATE TABLE x(a CHECK (a IN ({numbers})));"), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, RewriteError::TooLong { .. }), "{err}");
    state.start_second_pass();
    let err = state.statement(&format!("INSERT INTO \"wide\" VALUES({numbers});"), &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("\"wide\""), "{err}");
}

#[test]
fn a_dump_using_the_helper_tables_name_is_refused() {
    let mut state = RewriteState::new(false);
    let err = state.statement(&format!("CREATE TABLE \"{PIECES}\"(a);"), &mut Vec::new()).unwrap_err();
    assert_eq!(err, RewriteError::ReservedName);
}

#[test]
fn indexes_views_and_triggers_come_after_every_table_views_in_dependency_order_triggers_last() {
    // D1's dump order: tables, then `ORDER BY type`: index, trigger, view.
    let dump = "CREATE TABLE t(a);\n\
        CREATE INDEX i ON t(a);\n\
        CREATE TRIGGER tr INSTEAD OF INSERT ON v_outer BEGIN INSERT INTO t VALUES(new.a); END;\n\
        CREATE VIEW v_outer AS SELECT * FROM v_inner;\n\
        CREATE VIEW v_inner AS SELECT a FROM t;\n\
        CREATE TABLE late(b);";
    assert_eq!(
        rewrite(dump, false),
        [
            "PRAGMA defer_foreign_keys=TRUE;",
            "CREATE TABLE t(a);",
            "CREATE TABLE late(b);",
            "CREATE INDEX i ON t(a);",
            "CREATE VIEW v_inner AS SELECT a FROM t;",
            "CREATE VIEW v_outer AS SELECT * FROM v_inner;",
            "CREATE TRIGGER tr INSTEAD OF INSERT ON v_outer BEGIN INSERT INTO t VALUES(new.a); END;",
        ]
    );
}

#[test]
fn every_table_is_created_before_any_row_so_a_childs_rows_may_come_before_its_parent_table() {
    // D1's dump: each table's rows right after it, in `sqlite_schema` order.
    let dump = "PRAGMA defer_foreign_keys=TRUE;\n\
        CREATE TABLE child(id INTEGER PRIMARY KEY, p REFERENCES parent(id));\n\
        INSERT INTO \"child\" (\"id\",\"p\") VALUES(1,5);\n\
        CREATE TABLE parent(id INTEGER PRIMARY KEY);\n\
        INSERT INTO \"parent\" (\"id\") VALUES(5);";
    assert_eq!(
        rewrite(dump, false),
        [
            "PRAGMA defer_foreign_keys=TRUE;",
            "CREATE TABLE child(id INTEGER PRIMARY KEY, p REFERENCES parent(id));",
            "CREATE TABLE parent(id INTEGER PRIMARY KEY);",
            "INSERT INTO \"child\" (\"id\",\"p\") VALUES(1,5);",
            "INSERT INTO \"parent\" (\"id\") VALUES(5);",
        ]
    );
}

#[test]
fn views_that_name_each_other_in_a_cycle_keep_dump_order() {
    let dump = "CREATE VIEW a AS SELECT * FROM b;\nCREATE VIEW b AS SELECT * FROM a;";
    let lines = rewrite(dump, false);
    assert_eq!(lines[1..], ["CREATE VIEW a AS SELECT * FROM b;", "CREATE VIEW b AS SELECT * FROM a;"]);
}

#[test]
fn replace_drops_each_object_of_the_dump_just_before_creating_it() {
    let dump = "CREATE TABLE IF NOT EXISTS \"we\"\"ird\"(a);\nCREATE TABLE main.Plain(b);\n\
        CREATE UNIQUE INDEX IF NOT EXISTS ix ON Plain(b);\nCREATE VIEW v AS SELECT 1;\n\
        CREATE TRIGGER tg AFTER INSERT ON Plain BEGIN SELECT 1; END;";
    assert_eq!(
        rewrite(dump, true),
        [
            "PRAGMA defer_foreign_keys=TRUE;",
            "DROP TABLE IF EXISTS \"we\"\"ird\";",
            "CREATE TABLE IF NOT EXISTS \"we\"\"ird\"(a);",
            "DROP TABLE IF EXISTS \"Plain\";",
            "CREATE TABLE main.Plain(b);",
            "DROP INDEX IF EXISTS \"ix\";",
            "CREATE UNIQUE INDEX IF NOT EXISTS ix ON Plain(b);",
            "DROP VIEW IF EXISTS \"v\";",
            "CREATE VIEW v AS SELECT 1;",
            "DROP TRIGGER IF EXISTS \"tg\";",
            "CREATE TRIGGER tg AFTER INSERT ON Plain BEGIN SELECT 1; END;",
        ]
    );
}

#[test]
fn too_much_held_back_schema_is_refused() {
    let mut state = RewriteState::new(false);
    state.start_second_pass();
    let view = format!("CREATE VIEW v AS SELECT '{}';", "x".repeat(90_000));
    let mut result = Ok(());
    for _ in 0..(MAX_DEFERRED / 90_000 + 1) {
        result = state.statement(&view, &mut Vec::new());
    }
    assert_eq!(result, Err(RewriteError::SchemaTooLarge));
}

/// Stages `inputs` (held in memory) step by step, each step resuming from a state that went
/// through JSON; returns the chunks joined, and the final state.
fn stage(inputs: &[&str], step_bytes: u64) -> (Vec<u8>, Staging) {
    let list = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| Input { key: format!("in{i}"), size: s.len() as u64, sealed: None })
        .collect();
    let mut st = Staging::new(list, "job/".into(), false);
    let mut all = Vec::new();
    for _ in 0..10_000 {
        if st.done {
            break;
        }
        let data = st.next_read(step_bytes).map(|(key, offset, len)| {
            let i: usize = key[2..].parse().unwrap();
            &inputs[i].as_bytes()[offset as usize..(offset + len) as usize]
        });
        let out = st.step(data, step_bytes).unwrap();
        all.extend_from_slice(&out.chunk);
        st = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
    }
    assert!(st.done);
    (all, st)
}

#[test]
fn staging_in_small_steps_gives_the_same_file_and_md5_as_one_step_and_extra_inputs_follow_the_dump() {
    let dump = "PRAGMA defer_foreign_keys=TRUE;\nCREATE TABLE t(a);\nINSERT INTO \"t\" (\"a\") VALUES('x;y');\n\
        CREATE VIEW v AS SELECT * FROM t;\nINSERT INTO \"t\" (\"a\") VALUES(2);";
    let extra = "CREATE VIRTUAL TABLE f USING fts5(a);\nINSERT INTO \"f\" (\"a\") VALUES('z');";
    let (small, st) = stage(&[dump, extra], 10);
    let (big, st_big) = stage(&[dump, extra], 1 << 20);
    assert_eq!(small, big);
    assert_eq!(st.final_md5().unwrap(), st_big.final_md5().unwrap());
    assert_eq!(st.final_md5().unwrap(), hex::encode(Md5::digest(&small)));
    assert_eq!(st.size(), small.len() as u64);
    assert!(st.chunks.len() > st_big.chunks.len());
    let text = String::from_utf8(small).unwrap();
    let at = |s: &str| text.find(s).unwrap();
    // Tables of every input first, then rows (the extra input's after the dump's), then the view.
    assert!(at("CREATE VIRTUAL TABLE f") < at("VALUES('x;y')"));
    assert!(at("VALUES(2)") < at("VALUES('z')") && at("VALUES('z')") < at("CREATE VIEW v"));
    assert_eq!(st.chunk_key(3), "job/00003.sql");
}

#[test]
fn a_statement_longer_than_a_step_may_read_is_refused_naming_where_it_starts() {
    let mut st = Staging::new(vec![Input { key: "k".into(), size: 100, sealed: None }], "p/".into(), false);
    let err = st.step(Some(b"INSERT INTO t VALUES('no end"), 5).unwrap_err();
    assert_eq!(err, RewriteError::Unterminated { key: "k".into(), offset: 0 });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_panic_in_any_steps(data in proptest::collection::vec(any::<u8>(), 0..600), step in 1u64..80) {
        let mut st = Staging::new(vec![Input { key: "k".into(), size: data.len() as u64, sealed: None }], "p/".into(), true);
        for _ in 0..1_000 {
            if st.done { break; }
            let read = st.next_read(step).map(|(_, off, len)| &data[off as usize..(off + len) as usize]);
            if st.step(read, step).is_err() { break; }
        }
    }

    #[test]
    fn arbitrary_statements_never_panic(s in "(INSERT INTO \"t\" \\(\"a\"\\) VALUES\\(|CREATE (VIEW|TRIGGER|TABLE|INDEX) |replace\\(|X'|'|,|\\)|;|[a-z0-9 ]){0,40}") {
        let mut state = RewriteState::new(true);
        let _ = state.statement(&s, &mut Vec::new());
        state.finish(&mut Vec::new());
    }

    #[test]
    fn long_generated_rows_always_fit_and_reassemble_exactly(
        text in "[a-zé' ;]{0,300}",
        repeat in 1usize..900,
        blob in proptest::collection::vec(any::<u8>(), 0..200),
        blob_repeat in 1usize..700,
    ) {
        let value: String = text.repeat(repeat);
        let escaped = value.replace('\'', "''");
        let hex = hex::encode(blob.repeat(blob_repeat));
        let stmt = format!("INSERT INTO \"t\" (\"a\",\"b\",\"c\") VALUES('{escaped}',42,X'{hex}');");
        let lines = rewrite(&stmt, false);
        prop_assert!(lines.iter().all(|l| l.len() <= MAX_STATEMENT));
        if stmt.len() > MAX_STATEMENT {
            let a = if lines.iter().any(|l| l.contains("VALUES(0, ")) { assembled(&lines, 0) } else { escaped.clone() };
            prop_assert!(a == escaped, "text reassembles");
            let c = if lines.iter().any(|l| l.contains("VALUES(2, ")) { assembled(&lines, 2) } else { hex.clone() };
            prop_assert!(c == hex, "blob reassembles");
        } else {
            prop_assert!(lines[1] == stmt, "a statement that fits passes through");
        }
    }
}
