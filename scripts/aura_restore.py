#!/usr/bin/env python3
"""Load a Ferry Neo4j export (graph.jsonl.gz) into an empty Neo4j database through the Query API.

Usage::

    python3 scripts/aura_restore.py graph.jsonl.gz --url https://<instance>.databases.neo4j.io \\
        --database neo4j --user neo4j --password-env NEO4J_PASSWORD [--batch 500]

How it works (plain Cypher, so it runs against Aura or any Neo4j ≥ 5 with the Query API):

1. Nodes are sent in ``UNWIND $rows AS row CREATE (n:`L1`:`L2`) SET n = row.props,
   n.`_ferry_id` = row.id`` batches, one statement per label set (labels cannot be parameters).
2. Relationships follow in ``UNWIND … MATCH (a {`_ferry_id`: row.start}), (b {`_ferry_id`:
   row.end}) CREATE (a)-[r:`TYPE`]->(b) SET r = row.props`` batches, one per type.
3. ``MATCH (n) WHERE n.`_ferry_id` IS NOT NULL REMOVE n.`_ferry_id``` removes the helper property.

The file is read as a stream and batches are bounded, so memory stays flat. A file without its
footer line is refused: it is not a complete export. For large graphs, create an index on
``_ferry_id`` first (``CREATE INDEX FOR (n:Label) ON (n._ferry_id)`` per label) to speed up step 2.
Only the Python standard library is needed.
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


def node_statement(labels: tuple[str, ...]) -> str:
    label_text = "".join(":" + quote(label) for label in labels)
    return f"UNWIND $rows AS row CREATE (n{label_text}) SET n = row.props, n.`_ferry_id` = row.id"


def relationship_statement(rel_type: str) -> str:
    return ("UNWIND $rows AS row MATCH (a {`_ferry_id`: row.start}), (b {`_ferry_id`: row.end}) "
            f"CREATE (a)-[r:{quote(rel_type)}]->(b) SET r = row.props")


CLEANUP = "MATCH (n) WHERE n.`_ferry_id` IS NOT NULL REMOVE n.`_ferry_id`"


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
    for _, item in read_lines(path):
        if item.get("type") == "footer":
            footer = item
    if footer is None:
        raise SystemExit(f"{path} has no footer line: the export is incomplete, refusing to restore it")

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
        lambda r: {"start": r["start"], "end": r["end"], "props": r.get("properties") or {}},
        relationship_statement,
    )
    log(f"restored {counts['relationships']} relationships")

    api.run(CLEANUP)
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
