"""Structured log lines that Cloud Logging reads from stderr, tied to the request.

Never pass an auth code, a Tiki token, a session token or a secret to these
functions: a test reads the whole suite's log output for any of them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any

logger = logging.getLogger("auth")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "auth_log_context", default=None
)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _configure() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = True


_configure()


def bind(**fields: Any) -> contextvars.Token[dict[str, Any] | None]:
    """Attach fields (trace, customer id, ...) to every later line of this request."""
    return _context.set({**(_context.get() or {}), **fields})


def reset(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _context.reset(token)


def _emit(level: int, message: str, fields: dict[str, Any], exc: bool) -> None:
    merged = {**(_context.get() or {}), **fields}
    logger.log(level, message, extra={"fields": merged}, exc_info=exc)


def info(message: str, **fields: Any) -> None:
    _emit(logging.INFO, message, fields, False)


def warning(message: str, **fields: Any) -> None:
    _emit(logging.WARNING, message, fields, False)


def error(message: str, *, exc: bool = False, **fields: Any) -> None:
    _emit(logging.ERROR, message, fields, exc)
