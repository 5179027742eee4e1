"""Tini App auth backend: Tiki auth-code login, sessions and user records.

Only what runs in Cloud Functions lives in this package; the local simulator,
the secret stand-in and the run tooling live in ``local/``.
"""
