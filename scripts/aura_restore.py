#!/usr/bin/env python3
"""Load a Ferry Neo4j export (graph.jsonl.gz) into an empty Neo4j database through the Query API.

Usage::

    python3 scripts/aura_restore.py graph.jsonl.gz --url https://<instance>.databases.neo4j.io \\
        --database neo4j --user neo4j --password-env NEO4J_PASSWORD [--batch 500]

How it works (plain Cypher, so it runs against Aura or any Neo4j ≥ 5 with the Query API), with
the statements Ferry's own restore sends: every node is loaded under one temporary label,
``_FerryImport``, whose ``_ferry_id`` is unique, so each lookup is an index lookup however large
the graph (APOC's Cypher export calls this a "unique import label"):

1. ``CREATE CONSTRAINT `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) REQUIRE
   n.`_ferry_id` IS UNIQUE`` (returns once its index is online).
2. Nodes are sent in ``UNWIND $rows AS row MERGE (n:`_FerryImport` {`_ferry_id`: row.id}) SET
   n:`L1`:`L2`, n += row.props`` batches, one statement per label set (labels cannot be
   parameters).
3. Relationships follow in ``UNWIND … MATCH (a:`_FerryImport` {`_ferry_id`: row.start}),
   (b:`_FerryImport` {`_ferry_id`: row.end}) MERGE (a)-[r:`TYPE` {`_ferry_id`: row.id}]->(b) SET
   r += row.props`` batches, one per type.
4. The label and the helper property come off in bounded batches (``MATCH (n:`_FerryImport`)
   WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` ...`` until none is left, then
   ``_ferry_id`` off relationships), and the constraint is dropped.

``MERGE`` makes a batch sent twice harmless. The file is read as a stream and batches are
bounded, so memory stays flat. A file without its footer line, or with a node labelled
``_FerryImport``, is refused before anything is written. Only the Python standard library is
needed.

The helper property is ``_ferry_id`` unless the graph itself has a property of that name; then it
is ``_ferry_id_<n>``, a name no element of the file has (and the constraint
``ferry_import_id_<n>``). A version 2 file (typed JSON, Ferry's exports since typed values) is
sent with ``Content-Type: application/vnd.neo4j.query``, every parameter typed, so dates stay
dates, points points and byte arrays bytes; a version 1 file (plain JSON) is sent as plain JSON.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections import defaultdict

FORMAT = "ferry-neo4j-jsonl"


def quote(name: str) -> str:
    """A Cypher identifier in backticks, with backticks doubled."""
    return "`" + name.replace("`", "``") + "`"


IMPORT_LABEL = "_FerryImport"
HELPER = "_ferry_id"
TYPED_JSON = "application/vnd.neo4j.query"
CLEANUP_LIMIT = 10000


class Helper:
    """The property the load keys elements by, and the constraint that indexes it."""

    def __init__(self, prop: str = HELPER):
        self.prop = prop
        self.constraint = "ferry_import_id" + prop[len(HELPER):]

    def create_constraint(self) -> str:
        return (f"CREATE CONSTRAINT {quote(self.constraint)} IF NOT EXISTS FOR (n:{quote(IMPORT_LABEL)}) "
                f"REQUIRE n.{quote(self.prop)} IS UNIQUE")

    def drop_constraint(self) -> str:
        return f"DROP CONSTRAINT {quote(self.constraint)} IF EXISTS"

    def cleanup_nodes(self) -> str:
        return (f"MATCH (n:{quote(IMPORT_LABEL)}) WITH n LIMIT $limit REMOVE n:{quote(IMPORT_LABEL)}, "
                f"n.{quote(self.prop)} RETURN count(n) AS cleaned")

    def cleanup_relationships(self) -> str:
        helper = quote(self.prop)
        return (f"MATCH ()-[r]->() WHERE r.{helper} IS NOT NULL WITH r LIMIT $limit "
                f"REMOVE r.{helper} RETURN count(r) AS cleaned")

    def node_statement(self, labels: tuple[str, ...]) -> str:
        label_text = "".join(":" + quote(label) for label in labels)
        set_labels = f"n{label_text}, " if label_text else ""
        return (f"UNWIND $rows AS row MERGE (n:{quote(IMPORT_LABEL)} {{{quote(self.prop)}: row.id}}) "
                f"SET {set_labels}n += row.props")

    def relationship_statement(self, rel_type: str) -> str:
        import_, helper = quote(IMPORT_LABEL), quote(self.prop)
        return (f"UNWIND $rows AS row MATCH (a:{import_} {{{helper}: row.start}}), "
                f"(b:{import_} {{{helper}: row.end}}) "
                f"MERGE (a)-[r:{quote(rel_type)} {{{helper}: row.id}}]->(b) SET r += row.props")


def choose_helper(keys) -> Helper:
    """``_ferry_id``, or when the graph has a property of that name, ``_ferry_id_<n>`` past every
    ``_ferry_id_<digits>`` it has: a name no element of the file uses."""
    if HELPER not in keys:
        return Helper()
    used = [int(k[len(HELPER) + 1:]) for k in keys if re.fullmatch(re.escape(HELPER) + r"_\d+", k)]
    return Helper(f"{HELPER}_{max(used, default=0) + 1}")


def node_statement(labels: tuple[str, ...]) -> str:
    return Helper().node_statement(labels)


def relationship_statement(rel_type: str) -> str:
    return Helper().relationship_statement(rel_type)


def typed_rows(rows: list) -> dict:
    """Rows of a version 2 file as typed JSON: ids are Strings, props the file's typed values."""
    def row(fields: dict) -> dict:
        value = {k: ({"$type": "Map", "_value": v} if k == "props" else {"$type": "String", "_value": v})
                 for k, v in fields.items()}
        return {"$type": "Map", "_value": value}
    return {"$type": "List", "_value": [row(r) for r in rows]}


class QueryApi:
    def __init__(self, url: str, database: str, user: str, password: str):
        self.endpoint = f"{url.rstrip('/')}/db/{database}/query/v2"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"authorization": f"Basic {token}", "content-type": "application/json",
                        "accept": "application/json"}
        self.statements = 0

    def run(self, statement: str, parameters: dict | None = None, typed: bool = False) -> dict:
        body = json.dumps({"statement": statement, "parameters": parameters or {}}).encode()
        headers = {**self.headers, "content-type": TYPED_JSON} if typed else self.headers
        req = urllib.request.Request(self.endpoint, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            answer = json.loads(e.read() or b"{}")
            if not answer.get("errors"):
                raise SystemExit(f"Query API answered HTTP {e.code}")
        if answer.get("errors"):
            first = answer["errors"][0]
            raise SystemExit(f"Query API error {first.get('code')}: {first.get('message')}")
        self.statements += 1
        return answer


def read_lines(path: str):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, json.loads(line)


def restore(path: str, api: QueryApi, batch: int = 500, log=print) -> dict:
    """Restores the export at `path`; returns the counts from its footer."""
    header = next(read_lines(path), (0, {}))[1]
    if header.get("type") != "header" or header.get("format") != FORMAT:
        raise SystemExit(f"{path} is not a {FORMAT} export")
    version = header.get("version", 1)
    if version not in (1, 2):
        raise SystemExit(f"{path} is format version {version}, which this tool does not know")
    typed = version == 2
    # Check completeness (and see which helper names the graph uses) before writing anything.
    footer = None
    keys: set = set()
    for number, item in read_lines(path):
        if item.get("type") == "footer":
            footer = item
        if item.get("type") == "node" and IMPORT_LABEL in (item.get("labels") or ()):
            raise SystemExit(f"{path} line {number}: a node labelled {IMPORT_LABEL}, the label the load goes through")
        keys.update(k for k in (item.get("properties") or {}) if k.startswith(HELPER))
    if footer is None:
        raise SystemExit(f"{path} has no footer line: the export is incomplete, refusing to restore it")
    helper = choose_helper(keys)
    if helper.prop != HELPER:
        log(f"the graph has {HELPER} properties: the load keys elements by {helper.prop}")
    api.run(helper.create_constraint())

    def send(statement: str, rows: list):
        api.run(statement, {"rows": typed_rows(rows) if typed else rows}, typed=typed)

    def load(kind: str, group_of, row_of, statement_of) -> int:
        """Sends every `kind` line in batches, one statement per group (label set or type)."""
        pending: dict = defaultdict(list)
        count = 0
        for _, item in read_lines(path):
            if item.get("type") != kind:
                continue
            group = group_of(item)
            pending[group].append(row_of(item))
            count += 1
            if len(pending[group]) >= batch:
                send(statement_of(group), pending.pop(group))
        for group, rows in pending.items():
            send(statement_of(group), rows)
        return count

    # Every node before any relationship that points at it.
    counts = {
        "nodes": load(
            "node",
            lambda n: tuple(n.get("labels") or ()),
            lambda n: {"id": n["id"], "props": n.get("properties") or {}},
            helper.node_statement,
        )
    }
    log(f"restored {counts['nodes']} nodes")
    counts["relationships"] = load(
        "relationship",
        lambda r: r["rel_type"],
        lambda r: {"id": r["id"], "start": r["start"], "end": r["end"], "props": r.get("properties") or {}},
        helper.relationship_statement,
    )
    log(f"restored {counts['relationships']} relationships")

    for cleanup in (helper.cleanup_nodes(), helper.cleanup_relationships()):
        while api.run(cleanup, {"limit": CLEANUP_LIMIT})["data"]["values"][0][0]:
            pass
    api.run(helper.drop_constraint())
    if counts != {"nodes": footer["nodes"], "relationships": footer["relationships"]}:
        raise SystemExit(f"restored {counts}, but the footer lists {footer}")
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file")
    p.add_argument("--url", required=True, help="the Query API base, e.g. https://<instance>.databases.neo4j.io")
    p.add_argument("--database", default="neo4j")
    p.add_argument("--user", default="neo4j")
    p.add_argument("--password-env", default="NEO4J_PASSWORD", help="environment variable holding the password")
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args(argv)
    password = os.environ.get(args.password_env)
    if not password:
        print(f"set {args.password_env} to the database user's password", file=sys.stderr)
        return 2
    api = QueryApi(args.url, args.database, args.user, password)
    counts = restore(args.file, api, args.batch)
    print(f"done: {counts['nodes']} nodes, {counts['relationships']} relationships in {api.statements} statements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
