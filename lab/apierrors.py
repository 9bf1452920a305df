"""API errors as the real API server reports them: `Status` objects with reason and code.

The lab API double raises `ApiStatusError` wherever the real server would answer with
an error; the HTTP layer sends `error.status` as the body with `error.code` as the
HTTP status, and in-process callers catch the exception and look at `code`/`reason`.
The messages follow the real ones word for word where clients or people match on
them (`services "web" not found`, `Operation cannot be fulfilled on ...`), and a 422
lists its field errors in `details.causes`, like `k8s.io/apimachinery`'s
`errors.NewInvalid`.

Pure values and constructors; nothing here blocks or holds state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApiStatusError",
    "FieldError",
    "already_exists",
    "bad_request",
    "conflict",
    "expired",
    "forbidden",
    "internal_error",
    "invalid",
    "method_not_allowed",
    "not_found",
    "status_object",
    "too_many_requests",
    "unavailable",
]

# HTTP code -> the reason the real API server puts in a Status for it.
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_object(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A `metav1.Status` failure object."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        status["details"] = details
    status["code"] = code
    return status


class ApiStatusError(Exception):
    """An API error; `status` is the `Status` object the server answers with."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.code = int(status["code"])
        self.reason = str(status.get("reason") or "")
        self.message = str(status.get("message") or "")
        super().__init__(f"{self.code} {self.reason}: {self.message}")

    def body(self) -> bytes:
        return json.dumps(self.status, separators=(",", ":")).encode()


def _details(name: str, resource: str, group: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = resource
    return details


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, group: str, name: str) -> ApiStatusError:
    return ApiStatusError(
        status_object(
            404,
            "NotFound",
            f'{_qualified(resource, group)} "{name}" not found',
            _details(name, resource, group),
        )
    )


def already_exists(resource: str, group: str, name: str) -> ApiStatusError:
    return ApiStatusError(
        status_object(
            409,
            "AlreadyExists",
            f'{_qualified(resource, group)} "{name}" already exists',
            _details(name, resource, group),
        )
    )


def conflict(resource: str, group: str, name: str, why: str) -> ApiStatusError:
    return ApiStatusError(
        status_object(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": {why}',
            _details(name, resource, group),
        )
    )


STALE_OBJECT = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def expired(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(410, "Expired", message))


def bad_request(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(400, "BadRequest", message))


def method_not_allowed(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(405, "MethodNotAllowed", message))


def forbidden(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(403, "Forbidden", message))


def internal_error(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(500, "InternalError", message))


def unavailable(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(503, "ServiceUnavailable", message))


def too_many_requests(message: str) -> ApiStatusError:
    return ApiStatusError(status_object(429, "TooManyRequests", message, {"retryAfterSeconds": 1}))


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation failure, as `k8s.io/apimachinery/pkg/util/validation/field.Error`."""

    field: str
    """Path like `spec.ports[0].port`."""
    kind: str
    """`Invalid`, `Required`, `Duplicate`, `NotSupported`, `Forbidden`."""
    value: Any = None
    detail: str = ""

    @property
    def cause_reason(self) -> str:
        return {
            "Invalid": "FieldValueInvalid",
            "Required": "FieldValueRequired",
            "Duplicate": "FieldValueDuplicate",
            "NotSupported": "FieldValueNotSupported",
            "Forbidden": "FieldValueForbidden",
        }[self.kind]

    @property
    def body(self) -> str:
        """The message without the field path (what `details.causes[].message` holds)."""
        if self.kind == "Required":
            return f"Required value: {self.detail}" if self.detail else "Required value"
        if self.kind == "Forbidden":
            return f"Forbidden: {self.detail}" if self.detail else "Forbidden"
        label = {"Invalid": "Invalid value", "Duplicate": "Duplicate value"}.get(
            self.kind, "Unsupported value"
        )
        text = f"{label}: {_go_value(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body}"


def _go_value(value: Any) -> str:
    # How Go's %#v shows the values the real validation errors quote.
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> ApiStatusError:
    """422 Invalid: `Service "web" is invalid: <errors>`."""
    qualified_kind = f"{kind}.{group}" if group else kind
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [
        {"reason": err.cause_reason, "message": err.body, "field": err.field} for err in errors
    ]
    return ApiStatusError(
        status_object(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {listed}', details)
    )
