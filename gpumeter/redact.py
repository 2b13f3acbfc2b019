"""Secrets out of what gpumeter prints and logs: a DSN or URL keeps its scheme, user, host and path,
never its password (``scheme://user:***@host``), nor a ``password=``/``token=``/``secret=`` value."""

from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@ - the password is everything up to the last @ before the host part
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)(?P<secret>[^\s/?#]*)(?P<at>@)")
# password=... in a query string or a libpq key=value string (PostgreSQL)
_PARAM = re.compile(r"(?P<head>\b(?:password|passwd|secret|sslpassword|PGPASSWORD)\s*=\s*)(?P<secret>'[^']*'|[^\s&;]+)",
                    re.IGNORECASE)  # fmt: skip
# "password": "..." in JSON or a dict's repr
_QUOTED = re.compile(r"""(?P<head>["'](?:password|passwd|secret)["']\s*:\s*)(?P<q>["'])(?P<secret>[^"']*)(?P=q)""",
                     re.IGNORECASE)  # fmt: skip


def redact(text: str) -> str:
    """``text`` with every URL password and password-like parameter replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    text = _QUOTED.sub(lambda m: f"{m['head']}{m['q']}{MASK}{m['q']}", text)
    return _PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


class RedactFilter:
    """A logging filter (on a handler) that redacts each record's text before any formatter sees it."""

    def filter(self, record: object) -> bool:
        import logging

        assert isinstance(record, logging.LogRecord)
        text = record.getMessage()
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # a traceback can quote a DSN too
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
