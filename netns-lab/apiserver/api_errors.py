"""Kubernetes Status objects and the errors that become them.

Every failure the lab API server reports is an ApiError (store.py) that the HTTP layer turns into a
Status body, as the real apiserver answers; these are the shared shorthands for building them."""

from __future__ import annotations

from dataclasses import dataclass

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


def unauthorized() -> ApiError:
    """401: no credentials, or not the lab's (the real apiserver says no more than this either)."""
    return ApiError(401, "Unauthorized", "Unauthorized")


@dataclass(frozen=True)
class FieldError:
    """One field's problem, as a Status cause: field path, cause reason and the human message."""

    field: str
    reason: str  # FieldValueInvalid, FieldValueDuplicate, FieldValueRequired, FieldValueTooMany, ...
    detail: str

    @classmethod
    def invalid(cls, field: str, value: object, why: str) -> FieldError:
        return cls(field, "FieldValueInvalid", f"Invalid value: {shown(value)}: {why}")

    @classmethod
    def duplicate(cls, field: str, value: object) -> FieldError:
        return cls(field, "FieldValueDuplicate", f"Duplicate value: {shown(value)}")

    @classmethod
    def required(cls, field: str) -> FieldError:
        return cls(field, "FieldValueRequired", "Required value")

    @classmethod
    def not_supported(cls, field: str, value: object, supported: tuple[str, ...]) -> FieldError:
        listed = ", ".join(f'"{s}"' for s in supported)
        return cls(field, "FieldValueNotSupported",
                   f"Unsupported value: {shown(value)}: supported values: {listed}")

    @classmethod
    def forbidden(cls, field: str, why: str) -> FieldError:
        return cls(field, "FieldValueForbidden", f"Forbidden: {why}")

    @classmethod
    def too_many(cls, field: str, count: int, limit: int) -> FieldError:
        return cls(field, "FieldValueTooMany", f"Too many: {count}: must have at most {limit} items")


def shown(value: object) -> str:
    """A value as the apiserver quotes it in messages: strings in double quotes."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def invalid_object(kind: str, name: object, errors: list[FieldError]) -> ApiError:
    """422 Invalid for every problem found in one object, each a cause naming its field (as the real
    apiserver answers, so clients and kubectl can point at the field)."""
    listed = [f"{e.field}: {e.detail}" for e in errors]
    summary = listed[0] if len(listed) == 1 else f"[{', '.join(listed)}]"
    causes = [{"reason": e.reason, "message": e.detail, "field": e.field} for e in errors]
    details = {"name": name if isinstance(name, str) else "", "kind": kind, "causes": causes}
    return ApiError(422, "Invalid", f'{kind} "{details["name"]}" is invalid: {summary}', details)
