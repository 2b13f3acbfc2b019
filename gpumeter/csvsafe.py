"""CSV cells a spreadsheet will not run (OWASP "CSV injection").

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read as a
formula by Excel, LibreOffice and Google Sheets, so a firm's name or a payment reference
like ``=HYPERLINK("http://...")`` could run when billing staff open an export. ``cell`` prefixes
such a text with ``'`` (shown as text, not evaluated); plain numbers, negative ones included,
stay as they are. Every CSV gpumeter writes goes through ``writer``.
"""

from __future__ import annotations

import csv
import re
from typing import Any, TextIO

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def cell(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_START) and not PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


class SafeWriter:
    """``csv.writer`` whose rows are neutralised cell by cell."""

    def __init__(self, stream: TextIO, **kwargs: Any) -> None:
        self._writer = csv.writer(stream, **kwargs)

    def writerow(self, row: Any) -> Any:
        return self._writer.writerow([cell(v) for v in row])

    def writerows(self, rows: Any) -> None:
        for row in rows:
            self.writerow(row)


def writer(stream: TextIO, **kwargs: Any) -> SafeWriter:
    return SafeWriter(stream, **kwargs)
