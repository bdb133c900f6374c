"""D1's SQL dump format, reproduced in Python.

This is a port of miniflare's ``packages/miniflare/src/workers/d1/dumpSql.ts``,
which the file itself says is kept in sync by hand with the remote D1 service
("d1-workers").  See provider-apis.md section 1.4.  Reproduced behaviour,
including the quirks:

* the first statement is always ``PRAGMA defer_foreign_keys=TRUE;`` (an empty
  database dumps exactly that one line);
* tables come from ``sqlite_schema`` (``type='table'``, non-null ``sql``) in
  rowid order with ``sqlite_sequence`` moved last; the ``tables`` filter applies
  to every table, ``sqlite_sequence`` included;
* ``sqlite_sequence`` gives ``DELETE FROM sqlite_sequence;`` and
  ``sqlite_stat*`` gives ``ANALYZE sqlite_schema;`` (unless ``no_schema``),
  followed by their rows;
* a ``CREATE VIRTUAL TABLE`` among the selected tables aborts the export;
* ``_cf_*`` and other ``sqlite_*`` tables are skipped entirely;
* ``CREATE TABLE "x"``/``CREATE TABLE 'x'`` becomes
  ``CREATE TABLE IF NOT EXISTS "x"`` (``sql[13:]``); the test is the same
  *unanchored* regular expression miniflare uses (``/CREATE TABLE ['"].*/``);
* rows are ``INSERT INTO "t" ("a","b") VALUES(1,'x');`` in SQLite scan order;
* indexes, triggers and views follow, ``ORDER BY type COLLATE NOCASE``, and the
  ``tables`` filter is checked against the object's *own* name (so an index is
  kept only when its own name is listed);
* values: ``NULL``; numbers printed the way JavaScript's ``Number#toString``
  prints them (integers travel through a double, as in D1, so int64 values
  beyond 2**53 lose precision); strings single-quoted with ``'`` doubled and
  CR/LF replaced by placeholders wrapped in ``replace(...,char(13))`` /
  ``replace(...,char(10))`` (SQLite shell's ``output_quoted_escaped_string``,
  including its fallback placeholders when the string already contains
  ``\\n``/``\\r``); blobs as ``X'<lowercase hex>'``;
* statements are joined with ``"\\n"``, no trailing newline, no BEGIN/COMMIT.
"""

from __future__ import annotations

import math
import re
import sqlite3
from decimal import Decimal

__all__ = ["DumpError", "VIRTUAL_TABLE_ERROR", "dump_sql", "dump_statements",
           "js_number_to_string", "format_value"]

VIRTUAL_TABLE_ERROR = "D1 Export error: cannot export databases with Virtual Tables (fts5)"

_QUOTED_CREATE_TABLE = re.compile(r"CREATE TABLE ['\"]")

_TABLES_QUERY = """
    SELECT name, type, sql
      FROM sqlite_schema AS o
    WHERE (true) AND type=='table'
      AND sql NOT NULL
    ORDER BY tbl_name='sqlite_sequence', rowid;
"""

_REST_OF_SCHEMA_QUERY = (
    "SELECT name, sql FROM sqlite_schema AS o WHERE (true) AND sql NOT NULL"
    "   AND type IN ('index', 'trigger', 'view') ORDER BY type COLLATE NOCASE"
)


class DumpError(Exception):
    """The database cannot be exported (D1 refuses it)."""


def escape_id(identifier: str) -> str:
    """Double-quote an identifier, doubling embedded double quotes."""
    return '"' + identifier.replace('"', '""') + '"'


def js_number_to_string(value: int | float) -> str:
    """Format a number exactly like JavaScript's ``Number.prototype.toString()``.

    Integers are first converted to a double, as D1 hands SQLite integers to
    the dump code as JavaScript numbers.
    """
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"  # JavaScript prints -0 as "0" as well
    sign = "-" if x < 0 else ""
    # repr() yields the shortest digit string that round-trips, as ECMAScript
    # requires; Decimal splits it into digits and exponent for us.
    _, digit_tuple, exponent = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = k + exponent  # value = 0.digits * 10**n
    if k <= n <= 21:
        body = digits + "0" * (n - k)
    elif 0 < n <= 21:
        body = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        body = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        exp = ("+" if e >= 0 else "-") + str(abs(e))
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        body = mantissa + "e" + exp
    return sign + body


def _unused_string(value: str, primary: str, secondary: str) -> str:
    """A placeholder not occurring in ``value`` (SQLite shell's unused_string)."""
    if primary not in value:
        return primary
    if secondary not in value:
        return secondary
    suffix = 0
    while True:
        candidate = f"({primary}{suffix})"
        suffix += 1
        if candidate not in value:
            return candidate


def quote_string(value: str) -> str:
    """Quote a TEXT value as miniflare's outputQuotedEscapedString does."""
    has_lf = "\n" in value
    has_cr = "\r" in value
    if not has_lf and not has_cr:
        return "'" + value.replace("'", "''") + "'"
    lf_placeholder = _unused_string(value, "\\n", "\\012")
    cr_placeholder = _unused_string(value, "\\r", "\\015")
    escaped = (value.replace("'", "''")
               .replace("\n", lf_placeholder)
               .replace("\r", cr_placeholder))
    output = f"'{escaped}'"
    if has_cr:
        output = f"replace({output},'{cr_placeholder}',char(13))"
    if has_lf:
        output = f"replace({output},'{lf_placeholder}',char(10))"
    return output


def format_value(cell: object) -> str:
    """Encode one SQLite value as a SQL literal, D1 style."""
    if cell is None:
        return "NULL"
    if isinstance(cell, (int, float)):
        return js_number_to_string(cell)
    if isinstance(cell, str):
        return quote_string(cell)
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return "X'" + bytes(cell).hex() + "'"
    return "ERROR"  # what miniflare emits for an unexpected cell type


def _table_schema(name: str, sql: str) -> str | None:
    """The schema statement for one table, or None for the special cases."""
    if name == "sqlite_sequence":
        return "DELETE FROM sqlite_sequence;"
    if re.match(r"^sqlite_stat.", name):
        return "ANALYZE sqlite_schema;"
    if _QUOTED_CREATE_TABLE.search(sql):
        return f"CREATE TABLE IF NOT EXISTS {sql[13:]};"
    return f"{sql};"


def _table_rows(conn: sqlite3.Connection, table: str):
    """INSERT statements for every row of ``table`` in scan order."""
    columns = [row[1] for row in conn.execute(f"PRAGMA table_info={escape_id(table)}")]
    select = f"SELECT {', '.join(escape_id(c) for c in columns)} FROM {escape_id(table)};"
    column_list = ",".join(escape_id(c) for c in columns)
    prefix = f"INSERT INTO {escape_id(table)} ({column_list}) VALUES("
    for row in conn.execute(select):
        yield prefix + ",".join(format_value(cell) for cell in row) + ");"


def dump_statements(conn: sqlite3.Connection, tables: list[str] | None = None,
                    no_data: bool = False, no_schema: bool = False):
    """Yield the dump statements one by one (miniflare's dumpSql generator)."""
    yield "PRAGMA defer_foreign_keys=TRUE;"
    wanted = set(tables or [])
    for name, _type, sql in conn.execute(_TABLES_QUERY).fetchall():
        if wanted and name not in wanted:
            continue
        special = name == "sqlite_sequence" or re.match(r"^sqlite_stat.", name)
        if not special:
            if sql.startswith("CREATE VIRTUAL TABLE"):
                raise DumpError(VIRTUAL_TABLE_ERROR)
            if name.startswith("_cf_") or name.startswith("sqlite_"):
                continue
        if not no_schema:
            yield _table_schema(name, sql)
        if not no_data:
            yield from _table_rows(conn, name)
    if not no_schema:
        for name, sql in conn.execute(_REST_OF_SCHEMA_QUERY).fetchall():
            if wanted and name not in wanted:
                continue
            yield f"{sql};"


def dump_sql(conn: sqlite3.Connection, tables: list[str] | None = None,
             no_data: bool = False, no_schema: bool = False) -> str:
    """The whole dump as D1's export produces it: statements joined by "\\n"."""
    return "\n".join(dump_statements(conn, tables, no_data=no_data, no_schema=no_schema))
