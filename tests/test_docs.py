"""The documentation's claims point at tests that exist."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _functions(path: pathlib.Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}


def test_bad_input_table_rows_are_backed_by_tests():
    text = (ROOT / "docs" / "bad_inputs.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 14 and len(refs) >= len(rows)
    for line in rows:
        assert "tests/" in line, line  # every row names its test
    for path, name in refs:
        assert name in _functions(ROOT / path), f"{path}::{name} does not exist"
