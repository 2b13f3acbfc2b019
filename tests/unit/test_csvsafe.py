"""CSV cells that start like a formula are written as text (OWASP), numbers stay numbers."""

from __future__ import annotations

import csv
import io

import pytest

from billing.app.statements import file_safe
from gpumeter import csvsafe


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ('=HYPERLINK("http://evil.example","pay here")', '\'=HYPERLINK("http://evil.example","pay here")'),
        ("+1+2", "'+1+2"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
        ("-3.50", "-3.50"), ("12", "12"), ("F0001", "F0001"), ("a=b", "a=b"), ("", ""),
    ],
)  # fmt: skip
def test_a_cell_that_starts_like_a_formula_is_text(value: str, written: str) -> None:
    buf = io.StringIO()
    csvsafe.writer(buf).writerow([value, 7])
    assert next(csv.reader(io.StringIO(buf.getvalue()))) == [written, "7"]


def test_a_statement_file_name_never_names_a_folder() -> None:
    assert file_safe("F0001") == "F0001" and file_safe("acme.ai_2-x") == "acme.ai_2-x"
    assert file_safe("a/../../etc") == "a%2F..%2F..%2Fetc" and "/" not in file_safe("/x")
