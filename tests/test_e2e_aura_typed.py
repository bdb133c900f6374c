"""End to end: Neo4j values keep their Cypher types through a Ferry backup and Ferry's logical
load (typed JSON), a drill compares them value for value and type for type, pages cost what they read (id ranges, EXPLAINed once), a source property named
`_ferry_id` is data like any other, and an export written before typed JSON (format 1) still
loads. One Worker and one emulator for the module."""

from __future__ import annotations

import gzip
import json

import sys

import pytest

from harness import AURA_SECRETS, NEO4J_PASSWORD, ROOT, AuraEmulator, Ferry, aura_source
from test_e2e_aura import canonical  # nodes and relationships by content (here: typed properties)

sys.path.insert(0, str(ROOT / "scripts"))
import aura_restore  # noqa: E402


def typed(kind: str, value):
    return {"$type": kind, "_value": value}


def tlist(kind: str, values: list):
    return typed("List", [typed(kind, v) for v in values])


# Every Cypher property type (Query API docs, "Result formats", typed JSON table), on nodes and
# relationships: temporals with zone ids and offsets, durations, 2D and 3D points in each CRS, byte
# arrays, integers beyond 2^53, NaN and ±Infinity, lists of these, and properties named like
# Ferry's load helper.
EVERY_TYPE = {
    "date": typed("Date", "2015-03-26"),
    "date_bce": typed("Date", "-0044-03-15"),
    "time": typed("Time", "12:50:35.556+01:00"),
    "time_utc": typed("Time", "23:59:59.999999999Z"),
    "local_time": typed("LocalTime", "12:50:35.556"),
    "zoned": typed("ZonedDateTime", "2015-11-21T21:40:32.142+01:00[Europe/Berlin]"),
    "zoned_troll": typed("ZonedDateTime", "2015-11-21T21:40:32.142Z[Antarctica/Troll]"),
    "offset": typed("OffsetDateTime", "2024-01-01T21:40:32-01:00"),
    "local_datetime": typed("LocalDateTime", "2015-07-04T19:32:24"),
    "duration": typed("Duration", "P14DT16H12M"),
    "duration_neg": typed("Duration", "P-1Y-2MT-0.5S"),
    "cartesian": typed("Point", "SRID=7203;POINT (1.2 3.4)"),
    "cartesian_3d": typed("Point", "SRID=9157;POINT Z (1.2 3.4 5.6)"),
    "wgs84": typed("Point", "SRID=4326;POINT (12.5 55.7)"),
    "wgs84_3d": typed("Point", "SRID=4979;POINT Z (12.5 55.7 100.0)"),
    "bytes": typed("Base64", "AAEC/w=="),
    "big": typed("Integer", "9007199254740993"),
    "int_max": typed("Integer", "9223372036854775807"),
    "int_min": typed("Integer", "-9223372036854775808"),
    "nan": typed("Float", "NaN"),
    "inf": typed("Float", "Infinity"),
    "ninf": typed("Float", "-Infinity"),
    "neg_zero": typed("Float", "-0.0"),
    "tiny": typed("Float", "4.9E-324"),
    "looks_like_a_date": typed("String", "2015-03-26"),
    "flag": typed("Boolean", True),
    "dates": tlist("Date", ["2015-03-26", "2016-02-29"]),
    "zoned_list": tlist("ZonedDateTime", ["2015-11-21T21:40:32.142+01:00[Europe/Berlin]"]),
    "durations": tlist("Duration", ["P1D", "PT0S"]),
    "points": tlist("Point", ["SRID=4326;POINT (1.0 2.0)", "SRID=4326;POINT (3.0 4.0)"]),
    "floats": tlist("Float", ["NaN", "1.5", "-Infinity"]),
    "ints": tlist("Integer", ["9007199254740993", "-1"]),
    "_ferry_id": typed("String", "the source's own _ferry_id"),
    "_ferry_id_1": typed("Integer", "7"),
}
HOSTILE = {
    "nodes": [
        {"labels": ["Value"], "props": EVERY_TYPE},
        {"labels": ["Value", "Other"], "props": {"_ferry_id": typed("Integer", "42"), "when": typed("Date", "2000-01-01")}},
        {"labels": [], "props": {}},
        {"labels": ["Other"], "props": {"_ferry_id": typed("Integer", "42")}},  # the same value twice
    ],
    "relationships": [
        {"type": "HAS", "start": 0, "end": 1, "props": EVERY_TYPE},
        {"type": "HAS", "start": 1, "end": 0, "props": {"at": typed("LocalDateTime", "2015-07-04T19:32:24"),
                                                         "_ferry_id": typed("String", "r")}},
        {"type": "SELF", "start": 2, "end": 2, "props": {}},
    ],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work = tmp_path_factory.mktemp("aura-typed-e2e")
    emulator = AuraEmulator(work, nodes=300, rels=600)
    status, _, body = emulator.http.request("POST", "/__control/graph?db=hostile", json.dumps(HOSTILE).encode())
    assert status == 200, body
    sources = [
        # Pages of two ids: the hostile graph is read in several id ranges.
        aura_source("typed", emulator, mode="logical", database="hostile", page_size=2, drill_database="typed-drill"),
        aura_source("graph", emulator, mode="logical", page_size=50),
    ]
    ferry = Ferry(work / "ferry", sources, secrets=AURA_SECRETS)
    yield {"ferry": ferry, "emulator": emulator}
    ferry.stop()
    emulator.stop()


def typed_graph(emulator, db: str) -> dict:
    status, _, body = emulator.http.request("GET", f"/__control/graph?db={db}&typed=1")
    assert status == 200, body
    return json.loads(body)


def backup(world, source: str) -> tuple[dict, dict]:
    ferry = world["ferry"]
    job = ferry.webhook_job(source, timeout=120)
    assert job["phase"] == "committed", job
    (manifest,) = [m for m in ferry.backups(source) if m["job_id"] == job["id"]]
    return job, manifest


def load(world, manifest: dict, db: str, **extra) -> dict:
    folder = manifest["artifacts"][0]["key"].rsplit("/", 1)[0] + "/"
    status, answer = world["ferry"].restore(folder, {"mode": "logical", "target": {"database": db}, "confirm": db,
                                                     **extra})
    assert status == 202, answer
    return world["ferry"].wait_job(answer["job"]["id"], timeout=120)


def test_every_cypher_value_type_round_trips_type_for_type_through_backup_and_logical_load(world, tmp_path):
    ferry, emulator = world["ferry"], world["emulator"]
    _, manifest = backup(world, "typed")
    _, body = ferry.artifact(manifest["artifacts"][0]["key"])
    lines = [json.loads(line) for line in gzip.decompress(body).decode().splitlines()]
    assert lines[0]["version"] == 2 and lines[0]["values"] == "typed-json", lines[0]
    node = next(e for e in lines if e["type"] == "node" and "date" in e["properties"])
    assert node["properties"]["date"] == typed("Date", "2015-03-26"), "the export keeps the type"
    assert node["properties"]["big"] == typed("Integer", "9007199254740993")
    job = load(world, manifest, "hostile-copy", batch_size=2)
    assert job["phase"] == "restored", job
    original, restored = typed_graph(emulator, "hostile"), typed_graph(emulator, "hostile-copy")
    assert canonical(restored) == canonical(original)
    value = next(n for n in restored["nodes"] if "date" in n["props"])["props"]
    assert {k: value[k]["$type"] for k in ("date", "zoned", "offset", "cartesian_3d", "bytes", "nan")} == {
        "date": "Date", "zoned": "ZonedDateTime", "offset": "OffsetDateTime", "cartesian_3d": "Point",
        "bytes": "Base64", "nan": "Float"}
    assert value["_ferry_id"] == typed("String", "the source's own _ferry_id"), "a source _ferry_id is data"
    helpers = {k for e in restored["nodes"] + restored["relationships"] for k in e["props"]} - set(EVERY_TYPE)
    assert helpers <= {"when", "at"}, f"nothing of the load is left: {helpers}"
    status, _, raw = emulator.http.request("GET", "/__control/database?db=hostile-copy")
    info = json.loads(raw)
    assert info["schema"] == [] and info["scans"] == 0, info
    # The offline tool loads the same file type for type, keyed by a helper the graph does not use.
    path = tmp_path / "graph.jsonl.gz"
    path.write_bytes(body)
    notes = []
    api = aura_restore.QueryApi(emulator.url, "hostile-script", "neo4j", NEO4J_PASSWORD)
    assert aura_restore.restore(str(path), api, batch=2, log=notes.append) == {"nodes": 4, "relationships": 3}
    assert any("_ferry_id_2" in n for n in notes), notes
    assert canonical(typed_graph(emulator, "hostile-script")) == canonical(original)


def test_pages_read_only_the_ids_they_ask_for_and_the_plan_is_checked_once_per_phase(world):
    emulator = world["emulator"]
    before = emulator.state()
    job, manifest = backup(world, "graph")
    after = emulator.state()
    assert manifest["artifacts"][0]["details"]["nodes"] == 300
    assert after["page_statements"] - before["page_statements"] >= 300 // 50 + 600 // 50
    assert after["page_touched_max"] <= 50, "a page of 50 ids touches at most 50 rows, not the graph"
    status, _, raw = emulator.http.request("GET", "/__control/database?db=neo4j")
    names = json.loads(raw)["statements"]
    assert names.count("explain_nodes_by_id") == 1 and names.count("explain_rels_by_id") == 1, names[:5]
    assert "nodes_page" not in names, "no element id paging"
    assert job.get("warnings", []) == [], job.get("warnings")


def test_a_paging_plan_that_scans_is_a_warning_on_the_job(world):
    emulator = world["emulator"]
    emulator.control(explain_scan=True)
    try:
        job, _ = backup(world, "graph")
    finally:
        emulator.control(explain_scan=False)
    assert any("AllNodesScan" in w for w in job.get("warnings", [])), job
    assert any("DirectedAllRelationshipsScan" in w for w in job["warnings"]), job["warnings"]


def test_an_export_written_before_typed_json_still_loads_as_plain_json(world):
    ferry, emulator = world["ferry"], world["emulator"]
    _, manifest = backup(world, "graph")
    key = manifest["artifacts"][0]["key"]
    _, body = ferry.artifact(key)
    old = [
        {"type": "header", "format": "ferry-neo4j-jsonl", "version": 1, "database": "neo4j",
         "exported_at": "2026-01-01T00:00:00.000Z"},
        {"type": "node", "id": "4:x:1", "labels": ["Old"], "properties": {"n": 9007199254740993, "s": "2015-03-26",
                                                                          "f": 1.5, "l": [1, 2]}},
        {"type": "node", "id": "4:x:2", "labels": [], "properties": {}},
        {"type": "relationship", "id": "5:x:1", "rel_type": "R", "start": "4:x:1", "end": "4:x:2",
         "properties": {"w": 0.25}},
        {"type": "footer", "nodes": 2, "relationships": 1},
    ]
    ferry.r2_put(key, gzip.compress(("\n".join(json.dumps(e) for e in old) + "\n").encode()))
    try:
        job = load(world, manifest, "old-format")
    finally:
        ferry.r2_put(key, body)
    assert job["phase"] == "restored", job
    g = typed_graph(emulator, "old-format")
    (node,) = [n for n in g["nodes"] if n["labels"] == ["Old"]]
    assert node["props"] == {"n": typed("Integer", "9007199254740993"), "s": typed("String", "2015-03-26"),
                             "f": typed("Float", "1.5"), "l": tlist("Integer", ["1", "2"])}
    assert [r["props"] for r in g["relationships"]] == [{"w": typed("Float", "0.25")}]


def drill(world, source: str) -> dict:
    status, answer = world["ferry"].api_post(f"/v1/sources/{source}/drill", {"batch_size": 2})
    assert status == 202, answer
    return world["ferry"].wait_job(answer["job"]["id"], timeout=120)


def test_a_drill_of_the_typed_graph_compares_every_value_type_for_type_and_passes(world):
    ferry, emulator = world["ferry"], world["emulator"]
    _, manifest = backup(world, "typed")
    assert set(manifest["artifacts"][0]["details"]["values"]["labels"]) == {"Value", "Other"}
    job = drill(world, "typed")
    assert job["phase"] == "restored", job
    record = ferry.backups("typed")[0]["drill"]
    assert record["job_id"] == job["id"] and record["passed"] is True, record
    assert record["values_compared"] is True and record["backup_values_from"] == "manifest", record
    assert emulator.graph("typed-drill") == {"nodes": [], "relationships": []}


def test_a_drill_of_a_typed_backup_whose_date_became_a_string_in_r2_fails_naming_the_label_and_property(world):
    """One property's type changed in the file (a Date turned into a String of the same text), the
    counts and the footer still matching: only comparing values type for type can catch it."""
    ferry = world["ferry"]
    _, manifest = backup(world, "typed")
    (art,) = [a for a in manifest["artifacts"] if a["filename"] == "graph.jsonl.gz"]
    _, body = ferry.artifact(art["key"])
    lines = [json.loads(line) for line in gzip.decompress(body).decode().splitlines()]
    node = next(e for e in lines if e["type"] == "node" and "date" in e["properties"])
    assert node["labels"] == ["Value"] and node["properties"]["date"] == typed("Date", "2015-03-26")
    node["properties"]["date"] = typed("String", "2015-03-26")
    try:
        ferry.r2_put(art["key"], gzip.compress(("\n".join(json.dumps(e) for e in lines) + "\n").encode()))
        job = drill(world, "typed")
        assert job["phase"] == "failed", job
        assert 'label "Value"' in job["error"] and '(property "date")' in job["error"], job["error"]
        assert "nodes restored" not in job["error"], "the counts matched"
        record = ferry.backups("typed")[0]["drill"]
        assert record["passed"] is False and record["values_compared"] is True, record
    finally:
        ferry.r2_put(art["key"], body)
