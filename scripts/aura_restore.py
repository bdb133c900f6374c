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
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import sys
import urllib.error
import urllib.request
from collections import defaultdict

FORMAT = "ferry-neo4j-jsonl"


def quote(name: str) -> str:
    """A Cypher identifier in backticks, with backticks doubled."""
    return "`" + name.replace("`", "``") + "`"


IMPORT_LABEL = "_FerryImport"
CREATE_CONSTRAINT = ("CREATE CONSTRAINT `ferry_import_id` IF NOT EXISTS FOR (n:`_FerryImport`) "
                     "REQUIRE n.`_ferry_id` IS UNIQUE")
DROP_CONSTRAINT = "DROP CONSTRAINT `ferry_import_id` IF EXISTS"
CLEANUP_NODES = ("MATCH (n:`_FerryImport`) WITH n LIMIT $limit REMOVE n:`_FerryImport`, n.`_ferry_id` "
                 "RETURN count(n) AS cleaned")
CLEANUP_RELATIONSHIPS = ("MATCH ()-[r]->() WHERE r.`_ferry_id` IS NOT NULL WITH r LIMIT $limit "
                         "REMOVE r.`_ferry_id` RETURN count(r) AS cleaned")
CLEANUP_LIMIT = 10000


def node_statement(labels: tuple[str, ...]) -> str:
    label_text = "".join(":" + quote(label) for label in labels)
    set_labels = f"n{label_text}, " if label_text else ""
    return (f"UNWIND $rows AS row MERGE (n:{quote(IMPORT_LABEL)} {{`_ferry_id`: row.id}}) "
            f"SET {set_labels}n += row.props")


def relationship_statement(rel_type: str) -> str:
    return ("UNWIND $rows AS row MATCH (a:`_FerryImport` {`_ferry_id`: row.start}), "
            "(b:`_FerryImport` {`_ferry_id`: row.end}) "
            f"MERGE (a)-[r:{quote(rel_type)} {{`_ferry_id`: row.id}}]->(b) SET r += row.props")


class QueryApi:
    def __init__(self, url: str, database: str, user: str, password: str):
        self.endpoint = f"{url.rstrip('/')}/db/{database}/query/v2"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"authorization": f"Basic {token}", "content-type": "application/json",
                        "accept": "application/json"}
        self.statements = 0

    def run(self, statement: str, parameters: dict | None = None) -> dict:
        body = json.dumps({"statement": statement, "parameters": parameters or {}}).encode()
        req = urllib.request.Request(self.endpoint, data=body, method="POST", headers=self.headers)
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
    # Check completeness before writing anything.
    footer = None
    for number, item in read_lines(path):
        if item.get("type") == "footer":
            footer = item
        if item.get("type") == "node" and IMPORT_LABEL in (item.get("labels") or ()):
            raise SystemExit(f"{path} line {number}: a node labelled {IMPORT_LABEL}, the label the load goes through")
    if footer is None:
        raise SystemExit(f"{path} has no footer line: the export is incomplete, refusing to restore it")
    api.run(CREATE_CONSTRAINT)

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
                api.run(statement_of(group), {"rows": pending.pop(group)})
        for group, rows in pending.items():
            api.run(statement_of(group), {"rows": rows})
        return count

    # Every node before any relationship that points at it.
    counts = {
        "nodes": load(
            "node",
            lambda n: tuple(n.get("labels") or ()),
            lambda n: {"id": n["id"], "props": n.get("properties") or {}},
            node_statement,
        )
    }
    log(f"restored {counts['nodes']} nodes")
    counts["relationships"] = load(
        "relationship",
        lambda r: r["rel_type"],
        lambda r: {"id": r["id"], "start": r["start"], "end": r["end"], "props": r.get("properties") or {}},
        relationship_statement,
    )
    log(f"restored {counts['relationships']} relationships")

    for cleanup in (CLEANUP_NODES, CLEANUP_RELATIONSHIPS):
        while api.run(cleanup, {"limit": CLEANUP_LIMIT})["data"]["values"][0][0]:
            pass
    api.run(DROP_CONSTRAINT)
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
