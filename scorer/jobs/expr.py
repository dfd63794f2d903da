"""Row filters and text templates of jobs.yaml, compiled to pyarrow.compute (nothing is ever eval'd).

A `filter` is a small boolean expression over columns, written like Python and parsed with `ast` only
to read its shape; every node is translated to a `pyarrow.compute.Expression` from a fixed whitelist:

    lang == "en" and len(body) > 20
    section in ["games", "sound"] and not (split == "test")
    title is not None and starts_with(title, "lib")

  comparisons   ==  !=  <  <=  >  >=  (chains such as 1 < x <= 5 too), `in` / `not in` a list of constants
  booleans      and  or  not          null tests   x is None, x is not None
  constants     strings, numbers, true/false (True/False), None
  functions     len(s) (characters), lower(s), upper(s), starts_with(s, "p"), ends_with(s, "p"),
                contains(s, "p"), col("a column name with spaces")
A row whose filter is null (a comparison with a null value) is dropped, as in SQL.

A `text` is either a column name or a template such as "{title}\\n\\n{body}": the named columns are cast to
string and joined; a null column counts as empty, a row whose columns are all null has a null text.
"""

from __future__ import annotations

import ast
import string
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from scorer.jobs.lake import error_line

__all__ = ["FilterError", "compile_filter", "TextSpec", "parse_text"]


class FilterError(ValueError):
    """A filter outside the supported syntax; the message says what is allowed."""


_CMP = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}
_STR1 = {"len": pc.utf8_length, "lower": pc.utf8_lower, "upper": pc.utf8_upper}
_STR2 = {"starts_with": pc.starts_with, "ends_with": pc.ends_with, "contains": pc.match_substring}
ALLOWED = "comparisons, and/or/not, in [..], is None, len/lower/upper/starts_with/ends_with/contains/col"


def compile_filter(src: str) -> tuple[pc.Expression, list[str]]:
    """Compile a filter to a pyarrow expression; return it and the columns it reads (in order of use)."""
    try:
        tree = ast.parse(src.strip(), mode="eval")
    except SyntaxError as e:
        raise FilterError(f"filter {src!r} is not an expression: {e.msg} at column {e.offset}") from None
    cols: list[str] = []
    try:
        expr = _Compiler(src, cols).visit(tree.body)
    except FilterError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError,
            RecursionError) as e:  # pyarrow refusing the expression it was asked to build
        raise FilterError(f"filter {src!r} does not compile: {error_line(e)}") from None
    if not isinstance(expr, pc.Expression):
        raise FilterError(f"filter {src!r} is a constant, not a condition on columns")
    return expr, cols


class _Compiler:
    def __init__(self, src: str, cols: list[str]) -> None:
        self.src, self.cols = src, cols

    def fail(self, node: ast.AST, what: str) -> FilterError:
        return FilterError(f"filter {self.src!r}: {what} (at column {getattr(node, 'col_offset', 0) + 1}); allowed: {ALLOWED}")

    def field(self, name: str) -> pc.Expression:
        if name not in self.cols:
            self.cols.append(name)
        return pc.field(name)

    def visit(self, node: ast.AST):
        if isinstance(node, ast.BoolOp):
            parts = [self.visit(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.visit(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            v = node.operand.value
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return -v
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
            return node.value
        if isinstance(node, ast.Name):
            consts = {"true": True, "false": False, "null": None}
            return consts[node.id] if node.id in consts else self.field(node.id)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(node, f"{type(node).__name__} is not supported")

    def compare(self, node: ast.Compare):
        out = None
        left = self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            if isinstance(op, (ast.Is, ast.IsNot)):
                if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                    raise self.fail(right_node, "`is` only tests for None")
                if not isinstance(left, pc.Expression):
                    raise self.fail(node, "`is None` needs a column on its left")
                part = left.is_null() if isinstance(op, ast.Is) else ~left.is_null()
                right = None
            elif isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                    raise self.fail(right_node, "`in` needs a list of constants, e.g. x in [\"a\", \"b\"]")
                values = [self.visit(v) for v in right_node.elts]
                if any(isinstance(v, pc.Expression) for v in values) or not isinstance(left, pc.Expression):
                    raise self.fail(right_node, "`in` tests a column against a list of constants")
                part = left.isin(values)
                part = part if isinstance(op, ast.In) else ~part
                right = None
            else:
                right = self.visit(right_node)
                if left is None or right is None:
                    raise self.fail(node, "compare with None through `is None` / `is not None`")
                part = _CMP[type(op)](left, right)
            out = part if out is None else out & part
            left = right
        return out

    def call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise self.fail(node, "only plain function calls are allowed")
        name, args = node.func.id, node.args
        if name == "col" and len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
            return self.field(args[0].value)
        if name in _STR1 and len(args) == 1:
            return _STR1[name](self.visit(args[0]))
        if name in _STR2 and len(args) == 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
            return _STR2[name](self.visit(args[0]), pattern=args[1].value)
        raise self.fail(node, f"unknown function or arguments {name}(...)")


@dataclass(frozen=True)
class TextSpec:
    """The model input of a row: one string column, or a template over several columns."""

    source: str
    columns: tuple[str, ...]
    pieces: tuple[tuple[str, str | None], ...]  # (literal text before, column or None)

    @property
    def is_column(self) -> bool:
        return self.pieces == (("", self.source),)

    def build(self, table: pa.Table) -> pa.ChunkedArray | pa.Array:
        """The text of every row of `table` (string; null where all its columns are null)."""
        if self.is_column:
            return table[self.source]
        parts: list = []
        for literal, col in self.pieces:
            if literal:
                parts.append(pa.scalar(literal))
            if col is not None:
                parts.append(pc.cast(table[col], pa.string()))
        if not parts:
            return pa.array([self.source] * table.num_rows, pa.string())
        joined = pc.binary_join_element_wise(*parts, "", null_handling="replace", null_replacement="")
        if not self.columns:
            return joined
        all_null = table[self.columns[0]].is_null()
        for c in self.columns[1:]:
            all_null = pc.and_(all_null, table[c].is_null())
        return pc.if_else(all_null, pa.scalar(None, pa.string()), joined)


def parse_text(src: str) -> TextSpec:
    """`"text"` names a column; anything with `{name}` fields is a template ("{{" and "}}" are braces)."""
    if "{" not in src and "}" not in src:
        return TextSpec(src, (src,), (("", src),))
    try:
        parsed = list(string.Formatter().parse(src))
    except ValueError as e:
        raise FilterError(f"text template {src!r}: {e}; write literal braces as {{{{ and }}}}") from None
    pieces, cols = [], []
    for literal, field, spec, conv in parsed:
        if field is not None and (spec or conv or not field):
            raise FilterError(f"text template {src!r}: use plain {{column}} fields, without format specs")
        pieces.append((literal, field))
        if field is not None and field not in cols:
            cols.append(field)
    return TextSpec(src, tuple(cols), tuple(pieces))
