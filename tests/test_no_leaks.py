"""One check over the whole run: nothing secret in a log line, no Tiki token answered.

Runs last (see conftest); it reads every log line the backend wrote in this
process and in the instance processes, and every response body the tests saw.
"""

from __future__ import annotations

import pytest
from conftest import LEDGER

pytestmark = [pytest.mark.run_last, pytest.mark.no_backend]


def _all_log_text() -> str:
    parts = list(LEDGER.log_lines)
    for path in LEDGER.log_files:
        if path.exists():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def test_no_leaks_in_logs():
    if not LEDGER.responses:
        pytest.skip("reads what the rest of the suite logged: run the whole suite")
    logs = _all_log_text()
    secrets = LEDGER.secrets | LEDGER.access_tokens | LEDGER.refresh_tokens

    leaked = sorted(s[:6] + "…" for s in secrets if s and s in logs)

    assert LEDGER.access_tokens and LEDGER.refresh_tokens, "no Tiki tokens were seen"
    assert "Customer logged in." in logs, "the backend's logs were not captured"
    assert leaked == []


def test_no_leaks_of_tiki_tokens_in_responses():
    if not LEDGER.responses:
        pytest.skip("reads what the rest of the suite answered: run the whole suite")

    refresh_answered = [
        t[:6]
        for t in LEDGER.refresh_tokens
        if any(t in body for _, body in LEDGER.responses)
    ]
    access_answered_unasked = [
        t[:6]
        for t in LEDGER.access_tokens
        if any(t in body for exposed, body in LEDGER.responses if not exposed)
    ]

    assert refresh_answered == []
    assert access_answered_unasked == []
