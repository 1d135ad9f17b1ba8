"""Kubernetes Status objects and the errors that become them.

Every failure the lab API server reports is an ApiError (store.py) that the HTTP layer turns into a
Status body, as the real apiserver answers; these are the shared shorthands for building them."""

from __future__ import annotations

from netns_lab.apiserver.store import ApiError


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A meta/v1 Status: the body clients parse for every error (and for some successful deletes)."""
    status = "Success" if code < 400 else "Failure"
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": status,
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def bad_request(message: str) -> ApiError:
    """400: the request itself is malformed (bad query, body or selector)."""
    return ApiError(400, "BadRequest", message)


def invalid(message: str) -> ApiError:
    """422: the object is well-formed JSON but not a valid object of its kind."""
    return ApiError(422, "Invalid", message)
