"""RFC 9457 problem details: the one shape every error of the API takes.

Each problem type has a stable slug; its ``type`` URI is ``/problems/<slug>``, which the API serves
as a short page for humans. Raise :class:`Problem` (or a subclass) anywhere; the handlers here turn
it, and every framework error, into ``application/problem+json`` without leaking internals.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, TypeVar

import msgspec
from litestar import MediaType, Request, Response, get
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

PROBLEM_MEDIA_TYPE = "application/problem+json"
T = TypeVar("T")
log = logging.getLogger("sjaak.errors")


class ProblemType(msgspec.Struct, frozen=True):
    slug: str
    status: int
    title: str
    description: str


PROBLEM_TYPES: dict[str, ProblemType] = {
    p.slug: p
    for p in (
        ProblemType(
            "validation",
            422,
            "Invalid request",
            "The request body, query or path failed validation. `errors` lists each "
            "failing field as a JSON path with the reason.",
        ),
        ProblemType(
            "malformed-body",
            400,
            "Malformed request body",
            "The body is not valid JSON, or not the JSON type the endpoint expects.",
        ),
        ProblemType(
            "not-found",
            404,
            "Not found",
            "No such resource exists for your credential. Objects of other shops are "
            "reported as not found, never as forbidden.",
        ),
        ProblemType(
            "method-not-allowed",
            405,
            "Method not allowed",
            "The resource exists but does not support this HTTP method; see `Allow`.",
        ),
        ProblemType(
            "unauthenticated",
            401,
            "Authentication required",
            "The request has no valid credential. `detail` says what was wrong.",
        ),
        ProblemType(
            "forbidden",
            403,
            "Forbidden",
            "The credential is valid but may not perform this operation.",
        ),
        ProblemType(
            "insufficient-scope",
            403,
            "Insufficient scope",
            "The credential is valid but lacks a scope this operation needs; `detail` and the "
            "`WWW-Authenticate` header name it.",
        ),
        ProblemType(
            "origin-not-allowed",
            403,
            "Origin not allowed",
            "A publishable key was used from a web origin that is not on its list of allowed "
            "origins. Add the origin to the key.",
        ),
        ProblemType(
            "tenant-suspended",
            403,
            "Shop suspended",
            "The shop this credential belongs to is suspended. Reads and writes are "
            "refused until the platform operator resumes it.",
        ),
        ProblemType(
            "conflict",
            409,
            "Conflict",
            "The request conflicts with the current state of the resource.",
        ),
        ProblemType(
            "payload-too-large",
            413,
            "Payload too large",
            "The request body exceeds a documented size limit; `detail` names it.",
        ),
        ProblemType(
            "unsupported-media-type",
            415,
            "Unsupported media type",
            "Send request bodies as `application/json`.",
        ),
        ProblemType(
            "rate-limited",
            429,
            "Too many requests",
            "Slow down; `Retry-After` says when to try again.",
        ),
        ProblemType(
            "http-error", 400, "Bad request", "The request could not be processed as sent."
        ),
        ProblemType(
            "internal",
            500,
            "Internal server error",
            "Something failed on our side. Quote the `request_id` when contacting support.",
        ),
        ProblemType(
            "unavailable",
            503,
            "Service unavailable",
            "The service cannot serve requests right now; retry with backoff.",
        ),
    )
}


class FieldError(msgspec.Struct, frozen=True):
    """One failing field: ``path`` is a JSON path such as ``$.order.amount``."""

    path: str
    message: str


class ProblemBody(msgspec.Struct, omit_defaults=True):
    """The RFC 9457 body. ``errors`` is present only for validation problems."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


class Problem(Exception):
    """An error the client should see. ``slug`` must be a key of :data:`PROBLEM_TYPES`."""

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        status: int | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        problem_type = PROBLEM_TYPES[slug]
        super().__init__(detail)
        self.slug = slug
        self.title = problem_type.title
        self.status = status or problem_type.status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


def field_error(exc: msgspec.ValidationError, prefix: str = "$") -> FieldError:
    """msgspec's message at its JSON path (``prefix`` stands for the decoded value's root)."""
    message, _, path = str(exc).partition(" - at `")
    return FieldError(prefix + path.rstrip("`").removeprefix("$"), message)


_FIELD_MESSAGE = re.compile(r"^Object (contains unknown|missing required) field `(.+)`$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def exact_field(error: FieldError) -> FieldError:
    """``Object contains unknown field `x``` at ``$.a`` becomes ``unknown field`` at ``$.a.x``
    (likewise a missing required field): the error names the field itself."""
    found = _FIELD_MESSAGE.fullmatch(error.message)
    if found is None:
        return error
    name = found[2]
    key = f".{name}" if _IDENTIFIER.fullmatch(name) else f"[{msgspec.json.encode(name).decode()}]"
    what = "unknown field" if found[1] == "contains unknown" else "required field is missing"
    return FieldError(error.path + key, what)


def decode_json(body: bytes, kind: type[T], detail: str = "1 field(s) failed validation.") -> T:
    """``body`` as ``kind``: a 400 ``malformed-body`` when it is not JSON, a 422 naming the
    failing field (with ``detail``) when it does not fit."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise Problem("validation", detail, errors=[field_error(exc)]) from exc
    except msgspec.DecodeError as exc:
        raise Problem("malformed-body", f"The request body is not valid JSON: {exc}") from exc


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem responses an operation can return."""
    return {
        status: ResponseSpec(
            data_container=ProblemBody,
            media_type=PROBLEM_MEDIA_TYPE,
            description=HTTPStatus(status).phrase,
            generate_examples=False,
        )
        for status in statuses
    }


def problem_response(request: Request[Any, Any, Any], problem: Problem) -> Response[bytes]:
    body = ProblemBody(
        type=f"/problems/{problem.slug}",
        title=problem.title,
        status=problem.status,
        detail=problem.detail,
        instance=request.url.path,
        request_id=request.scope.get("state", {}).get("request_id"),
        errors=problem.errors,
    )
    return Response(
        content=msgspec.json.encode(body),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


def _validation_errors(extra: Any) -> list[FieldError]:
    """Litestar reports failing fields as ``{"message", "key", "source"}`` dicts."""
    errors: list[FieldError] = []
    for item in extra if isinstance(extra, list) else []:
        if not isinstance(item, dict):
            continue
        key = item.get("key")
        # Litestar gives the source as a ParamType enum for parameters, a string for the body.
        source = getattr(item.get("source"), "value", item.get("source"))
        if source in ("query", "path", "header", "cookie") and key:
            path = f"{source}.{key}"
        else:
            # A body error is keyed below "data", the handler's body parameter.
            path = "$" if key in (None, "", "data") else f"$.{key}"
        errors.append(FieldError(path=path, message=str(item.get("message", "invalid value"))))
    return errors


def handle_problem(request: Request[Any, Any, Any], exc: Problem) -> Response[bytes]:
    return problem_response(request, exc)


_HTTP_SLUGS = {
    400: "http-error",
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    429: "rate-limited",
    503: "unavailable",
}


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if isinstance(exc, ValidationException):
        errors = _validation_errors(exc.extra) or [FieldError(path="$", message=exc.detail)]
        return problem_response(
            request,
            Problem("validation", f"{len(errors)} field(s) failed validation.", errors=errors),
        )
    if isinstance(exc.__cause__, SerializationException):
        return problem_response(
            request,
            Problem("malformed-body", f"The request body is not valid JSON: {exc.__cause__}"),
        )
    status = exc.status_code
    slug = _HTTP_SLUGS.get(status, "http-error" if status < 500 else "internal")
    detail = exc.detail if status < 500 else PROBLEM_TYPES[slug].description
    headers = dict(exc.headers or {})
    if status == 405:
        detail = f"{request.method} is not supported on {request.url.path}."
    elif status == 404 and slug == "not-found":
        detail = f"Nothing lives at {request.url.path}."
    return problem_response(request, Problem(slug, detail, status=status, headers=headers))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(
        request,
        Problem(
            "internal", PROBLEM_TYPES["internal"].description, status=HTTP_500_INTERNAL_SERVER_ERROR
        ),
    )


def handle_too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[bytes]:
    """JSON nested thousands of levels deep exhausts the decoder's stack: a client error."""
    return problem_response(
        request, Problem("malformed-body", "The JSON body is nested too deeply.")
    )


EXCEPTION_HANDLERS = {
    RecursionError: handle_too_deep,
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}


@get(
    "/problems/{slug:str}",
    media_type=MediaType.HTML,
    include_in_schema=False,
    sync_to_thread=False,
    opt={"public": True},
)
def problem_page(slug: FromPath[str]) -> str:
    """A short human page for each problem type, so the ``type`` URIs resolve."""
    problem_type = PROBLEM_TYPES.get(slug)
    if problem_type is None:
        raise Problem("not-found", f"There is no problem type called {slug!r}.")
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        f"<title>{problem_type.title}</title>"
        f"<h1>{problem_type.title}</h1><p>HTTP status {problem_type.status}</p>"
        f"<p>{problem_type.description}</p></html>"
    )
