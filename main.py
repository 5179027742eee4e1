"""Cloud Functions entry points; each target deploys as its own function.

``local_router`` serves every function from one process, by path, for local
development (``make run``); it is not deployed.
"""

from __future__ import annotations

import flask
import functions_framework

from auth import web


@functions_framework.http
def exchange_auth_code(request: flask.Request) -> flask.Response:
    """POST {"code": "<my.getAuthCode code>"} -> a new session."""
    return web.serve(request, web.EXCHANGE)


@functions_framework.http
def refresh_auth_token(request: flask.Request) -> flask.Response:
    """POST with Authorization: Bearer <session> -> a new session."""
    return web.serve(request, web.REFRESH)


@functions_framework.http
def lookup_user(request: flask.Request) -> flask.Response:
    """GET with Authorization: Bearer <session> -> the caller's user record."""
    return web.serve(request, web.LOOKUP)


@functions_framework.http
def revoke_sessions(request: flask.Request) -> flask.Response:
    """POST with Authorization: Bearer <session> -> every session of the caller ends."""
    return web.serve(request, web.REVOKE)


@functions_framework.http
def delete_user(request: flask.Request) -> flask.Response:
    """POST with Authorization: Bearer <session> -> the caller's data is erased."""
    return web.serve(request, web.DELETE)


@functions_framework.http
def local_router(request: flask.Request) -> flask.Response:
    """Every function at /<target name>, for local development only."""
    endpoint = web.ENDPOINTS.get(request.path.strip("/"))
    if endpoint is None:
        return web.not_found(request)
    return web.serve(request, endpoint)
