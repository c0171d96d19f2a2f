"""A small Stripe for the tests: a local HTTP server speaking Stripe's wire format for exactly the
endpoints Sjaak uses, so the official library runs unchanged against it (pointed here through its
base address, ``SJAAK_STRIPE_API_BASE``).

What it honours, as Stripe does:

- requests are form-encoded (``line_items[0][price]=…``, ``metadata[k]=…``), answers are JSON
  objects with an ``object`` field, lists are ``{"object": "list", "data": […]}``;
- ``Authorization: Bearer <secret key>`` (401 otherwise) and the ``Stripe-Version`` header is
  recorded, so tests can see the pinned version arrive;
- errors have Stripe's shape, ``{"error": {"type", "code", "message", "param"}}``, with Stripe's
  statuses (400 bad parameters, 401, 404 unknown object, 429, 500);
- ``Idempotency-Key`` on a POST: the same key with the same parameters replays the first answer
  (``Idempotent-Replayed: true``), with other parameters it is a 400 ``idempotency_error``;
- meter events dedupe on ``identifier`` (counted once, as Stripe promises for at least 24 hours)
  and are summed per customer by ``/v1/billing/meters/{id}/event_summaries``.

Tests act as Stripe's dashboard and payment network through plain methods
(:meth:`FakeStripe.complete_checkout`, :meth:`fail_payment`, :meth:`pay` …), each returning the
events Stripe would send, which tests sign with Stripe's scheme (:func:`sign`) and post.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_KEY = "sk_test_sjaak_fake_0123456789"
Json = dict[str, Any]


class StripeError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: Json = {"error": {"type": type, "message": message}}
        if code:
            self.body["error"]["code"] = code
        if param:
            self.body["error"]["param"] = param


def missing(what: str, object_id: str, param: str | None = None) -> StripeError:
    return StripeError(
        404 if param is None else 400,
        f"No such {what}: '{object_id}'",
        code="resource_missing",
        param=param or "id",
    )


def parse_params(pairs: list[tuple[str, str]]) -> Json:
    """Stripe's form encoding back into nested objects: ``a[b][0][c]=v``."""
    root: Json = {}
    for key, value in pairs:
        parts = [key.split("[", 1)[0]] + [p.rstrip("]") for p in key.split("[")[1:]]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        converted = {k: _lists(v) for k, v in node.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return node


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe would send: ``t=<unix>,v1=<HMAC-SHA256 hex of
    "<t>.<payload>" under the endpoint's secret>``."""
    stamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


@dataclass
class Fault:
    method: str
    path: str
    status: int
    times: int
    #: Do the work first, then fail: the request happened, the answer was lost.
    after: bool = False


@dataclass
class Recorded:
    method: str
    path: str
    params: Json
    idempotency_key: str | None
    stripe_version: str | None
    status: int = 0


@dataclass
class Price:
    id: str
    #: ``licensed`` (a fee) or ``metered`` (billed from a meter).
    usage_type: str
    meter: str | None = None


@dataclass
class FakeStripe:
    api_key: str = API_KEY
    meter_id: str = "mtr_test_touchpoints"
    meter_event_name: str = "sjaak_touchpoints"
    prices: dict[str, Price] = field(default_factory=dict)
    customers: dict[str, Json] = field(default_factory=dict)
    sessions: dict[str, Json] = field(default_factory=dict)
    portal_sessions: dict[str, Json] = field(default_factory=dict)
    subscriptions: dict[str, Json] = field(default_factory=dict)
    invoices: dict[str, Json] = field(default_factory=dict)
    #: identifier -> the meter event, once; ``meter_posts`` has every identifier as posted.
    meter_events: dict[str, Json] = field(default_factory=dict)
    meter_posts: list[str] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    events: list[Json] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _idempotent: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None

    # -- the server --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload, headers = fake.handle(
                    self.command, self.path, body, {k.lower(): v for k, v in self.headers.items()}
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Request-Id", f"req_{secrets.token_hex(7)}")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- test controls -----------------------------------------------------------------------

    def add_price(self, price_id: str, usage_type: str = "licensed") -> None:
        meter = self.meter_id if usage_type == "metered" else None
        self.prices[price_id] = Price(price_id, usage_type, meter)

    def fail_next(
        self, method: str, path: str, *, status: int = 500, times: int = 1, after: bool = False
    ) -> None:
        """The next ``times`` requests whose path starts with ``path`` fail with ``status``."""
        with self._lock:
            self.faults.append(Fault(method.upper(), path, status, times, after))

    def calls(self, method: str, path_prefix: str) -> list[Recorded]:
        with self._lock:
            return [
                r for r in self.requests if r.method == method and r.path.startswith(path_prefix)
            ]

    def meter_total(self, customer: str) -> int:
        with self._lock:
            return sum(
                int(e["payload"]["value"])
                for e in self.meter_events.values()
                if e["payload"]["stripe_customer_id"] == customer
            )

    def complete_checkout(self, session_id: str) -> list[Json]:
        """The customer paid: the subscription is created (trialing when the session asked for
        a trial), the first invoice paid, the session complete."""
        with self._lock:
            session = self.sessions[session_id]
            details = session["_subscription_data"]
            trial_days = int(details.get("trial_period_days") or 0)
            now = int(time.time())
            sub_id = self._id("sub")
            items = [
                {
                    "id": self._id("si"),
                    "object": "subscription_item",
                    "price": {"id": line["price"], "object": "price"},
                    "quantity": int(line["quantity"]) if "quantity" in line else None,
                    "subscription": sub_id,
                    "current_period_start": now,
                    "current_period_end": now + 30 * 86_400,
                }
                for line in session["_line_items"]
            ]
            subscription = {
                "id": sub_id,
                "object": "subscription",
                "customer": session["customer"],
                "status": "trialing" if trial_days else "active",
                "created": now + len(self.subscriptions),
                "cancel_at_period_end": False,
                "canceled_at": None,
                "ended_at": None,
                "trial_end": now + trial_days * 86_400 if trial_days else None,
                "metadata": dict(details.get("metadata") or {}),
                "items": {
                    "object": "list",
                    "data": items,
                    "has_more": False,
                    "url": f"/v1/subscription_items?subscription={sub_id}",
                },
                "latest_invoice": None,
                "livemode": False,
            }
            self.subscriptions[sub_id] = subscription
            invoice = self._invoice(subscription, "paid")
            session.update(status="complete", subscription=sub_id, payment_status="paid")
            return [
                self._event("customer.subscription.created", subscription),
                self._event("invoice.paid", invoice),
                self._event("checkout.session.completed", self._public(session)),
            ]

    def fail_payment(self, sub_id: str) -> list[Json]:
        """The renewal's payment failed: the invoice stays open, the subscription is past due."""
        with self._lock:
            subscription = self.subscriptions[sub_id]
            invoice = self._invoice(subscription, "open")
            previous = self._set(subscription, status="past_due")
            return [
                self._event("invoice.payment_failed", invoice),
                self._event("customer.subscription.updated", subscription, previous),
            ]

    def pay(self, sub_id: str) -> list[Json]:
        """The open invoice got paid (a new card in the portal, a retry that worked)."""
        with self._lock:
            subscription = self.subscriptions[sub_id]
            invoice_id = subscription["latest_invoice"]
            invoice = self.invoices[invoice_id]
            invoice["status"] = "paid"
            previous = self._set(subscription, status="active")
            return [
                self._event("invoice.paid", dict(invoice)),
                self._event("customer.subscription.updated", subscription, previous),
            ]

    def set_status(self, sub_id: str, status: str) -> list[Json]:
        with self._lock:
            subscription = self.subscriptions[sub_id]
            previous = self._set(subscription, status=status)
            return [self._event("customer.subscription.updated", subscription, previous)]

    def cancel(self, sub_id: str) -> list[Json]:
        """Cancelled (in the portal, or by Stripe after failed retries)."""
        with self._lock:
            return [self._cancel(self.subscriptions[sub_id])]

    # -- requests ----------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        parts = urlsplit(raw_path)
        path = parts.path
        query = parse_qsl(parts.query, keep_blank_values=True)
        form = parse_qsl(body.decode(), keep_blank_values=True) if body else []
        params = parse_params(query + form)
        key = headers.get("idempotency-key")
        record = Recorded(method, path, params, key, headers.get("stripe-version"))
        with self._lock:
            self.requests.append(record)
            status, payload, extra = self._handle(method, path, params, key, headers)
            record.status = status
        return status, payload, extra

    def _handle(
        self, method: str, path: str, params: Json, key: str | None, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(StripeError(401, "Invalid API Key provided.", code="api_key_invalid"))
        fault = self._fault(method, path)
        if fault is not None and not fault.after:
            return _fault_answer(fault)
        fingerprint = json.dumps([method, path, params], sort_keys=True)
        if method == "POST" and key is not None and key in self._idempotent:
            first, status, payload = self._idempotent[key]
            if first != fingerprint:
                return _error(
                    StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters"
                        f" they were first used with. Try using a key other than '{key}' if you"
                        " meant to execute a different request.",
                        type="idempotency_error",
                    )
                )
            return status, payload, {"Idempotent-Replayed": "true", "Idempotency-Key": key}
        try:
            status, answer = 200, self._route(method, path, params)
        except StripeError as exc:
            status, answer = exc.status, exc.body
        payload = json.dumps(answer).encode()
        if method == "POST" and key is not None and status < 500:
            self._idempotent[key] = (fingerprint, status, payload)
        if fault is not None:
            return _fault_answer(fault)
        return status, payload, ({"Idempotency-Key": key} if key else {})

    def _fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and path.startswith(fault.path):
                fault.times -= 1
                return fault
        return None

    def _route(self, method: str, path: str, params: Json) -> Json:
        segments = path.strip("/").split("/")
        if segments[0] != "v1":
            raise StripeError(404, f"Unrecognized request URL ({method}: {path}).")
        match method, segments[1:]:
            case "POST", ["customers"]:
                return self._create_customer(params)
            case "GET", ["customers", customer_id]:
                return self._get(self.customers, "customer", customer_id)
            case "POST", ["checkout", "sessions"]:
                return self._create_session(params)
            case "GET", ["checkout", "sessions", session_id]:
                return self._public(self._get(self.sessions, "checkout.session", session_id))
            case "POST", ["billing_portal", "sessions"]:
                return self._create_portal_session(params)
            case "GET", ["subscriptions"]:
                return self._list_subscriptions(params)
            case "GET", ["subscriptions", sub_id]:
                return self._get(self.subscriptions, "subscription", sub_id)
            case "DELETE", ["subscriptions", sub_id]:
                subscription = self._get(self.subscriptions, "subscription", sub_id)
                if subscription["status"] == "canceled":
                    raise StripeError(
                        400, f"A canceled subscription can only update its metadata: {sub_id}"
                    )
                self.events.append(self._cancel(subscription))
                return subscription
            case "POST", ["billing", "meter_events"]:
                return self._meter_event(params)
            case "GET", ["billing", "meters", meter_id, "event_summaries"]:
                return self._summaries(meter_id, params)
        raise StripeError(404, f"Unrecognized request URL ({method}: {path}).")

    def _create_customer(self, params: Json) -> Json:
        customer = {
            "id": self._id("cus"),
            "object": "customer",
            "created": int(time.time()),
            "name": params.get("name"),
            "email": params.get("email"),
            "metadata": params.get("metadata") or {},
            "livemode": False,
        }
        self.customers[customer["id"]] = customer
        return customer

    def _create_session(self, params: Json) -> Json:
        mode = _required(params, "mode")
        if mode not in ("payment", "setup", "subscription"):
            raise StripeError(400, f"Invalid mode: {mode}", param="mode")
        customer = params.get("customer")
        if customer is not None and customer not in self.customers:
            raise missing("customer", customer, "customer")
        success_url = _required(params, "success_url")
        lines = params.get("line_items")
        if not isinstance(lines, list) or not lines:
            raise StripeError(400, "Missing required param: line_items.", param="line_items")
        for n, line in enumerate(lines):
            price = self.prices.get(line.get("price", ""))
            if price is None:
                raise missing("price", line.get("price", ""), f"line_items[{n}][price]")
            if price.usage_type == "metered" and "quantity" in line:
                raise StripeError(
                    400,
                    "Quantity should not be specified where usage_type is `metered`. Remove"
                    f" quantity from `line_items[{n}]`",
                    param=f"line_items[{n}][quantity]",
                )
        session_id = self._id("cs_test")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": mode,
            "customer": customer,
            "client_reference_id": params.get("client_reference_id"),
            "metadata": params.get("metadata") or {},
            "status": "open",
            "payment_status": "unpaid",
            "subscription": None,
            "success_url": success_url,
            "cancel_url": params.get("cancel_url"),
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "created": int(time.time()),
            "expires_at": int(time.time()) + 86_400,
            "livemode": False,
            "_line_items": lines,
            "_subscription_data": params.get("subscription_data") or {},
        }
        self.sessions[session_id] = session
        return self._public(session)

    def _create_portal_session(self, params: Json) -> Json:
        customer = _required(params, "customer")
        if customer not in self.customers:
            raise missing("customer", customer, "customer")
        session_id = self._id("bps")
        session = {
            "id": session_id,
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": params.get("return_url"),
            "url": f"https://billing.stripe.test/p/session/{session_id}",
            "created": int(time.time()),
            "livemode": False,
        }
        self.portal_sessions[session_id] = session
        return session

    def _list_subscriptions(self, params: Json) -> Json:
        status = params.get("status", "active")
        found = [
            s
            for s in self.subscriptions.values()
            if params.get("customer") in (None, s["customer"])
            and (status == "all" or s["status"] == status)
        ]
        found.sort(key=lambda s: s["created"], reverse=True)
        limit = int(params.get("limit", 10))
        return {
            "object": "list",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "url": "/v1/subscriptions",
        }

    def _meter_event(self, params: Json) -> Json:
        event_name = _required(params, "event_name")
        if event_name != self.meter_event_name:
            raise StripeError(
                400, f"No active meter was found for event_name: {event_name}", param="event_name"
            )
        payload = params.get("payload")
        if not isinstance(payload, dict) or "stripe_customer_id" not in payload:
            raise StripeError(400, "Missing required param: payload.", param="payload")
        value = payload.get("value", "")
        if not str(value).isdigit():
            raise StripeError(400, "The value must be a whole number.", param="payload[value]")
        now = int(time.time())
        timestamp = int(params.get("timestamp") or now)
        if timestamp < now - 35 * 86_400 or timestamp > now + 300:
            raise StripeError(
                400,
                "Timestamp must be within the past 35 calendar days and not more than 5 minutes"
                " in the future.",
                param="timestamp",
            )
        identifier = params.get("identifier") or self._id("mev")
        if len(identifier) > 100:
            raise StripeError(400, "identifier is too long (100 at most).", param="identifier")
        self.meter_posts.append(identifier)
        event = self.meter_events.setdefault(
            identifier,
            {
                "object": "billing.meter_event",
                "created": now,
                "event_name": event_name,
                "identifier": identifier,
                "livemode": False,
                "payload": dict(payload),
                "timestamp": timestamp,
            },
        )
        return event

    def _summaries(self, meter_id: str, params: Json) -> Json:
        if meter_id != self.meter_id:
            raise missing("billing.meter", meter_id)
        customer = _required(params, "customer")
        start, end = int(_required(params, "start_time")), int(_required(params, "end_time"))
        total = sum(
            int(e["payload"]["value"])
            for e in self.meter_events.values()
            if e["payload"]["stripe_customer_id"] == customer and start <= e["timestamp"] < end
        )
        summary = {
            "id": self._id("mtrusg"),
            "object": "billing.meter_event_summary",
            "aggregated_value": float(total),
            "start_time": start,
            "end_time": end,
            "livemode": False,
            "meter": meter_id,
        }
        return {"object": "list", "data": [summary], "has_more": False, "url": "/v1/billing"}

    # -- helpers -----------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}{secrets.token_hex(6)}"

    def _get(self, table: dict[str, Json], what: str, object_id: str) -> Json:
        found = table.get(object_id)
        if found is None:
            raise missing(what, object_id)
        return found

    @staticmethod
    def _public(obj: Json) -> Json:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    def _set(self, subscription: Json, **changes: Any) -> Json:
        previous = {k: subscription[k] for k in changes}
        subscription.update(changes)
        return previous

    def _cancel(self, subscription: Json) -> Json:
        previous = self._set(
            subscription,
            status="canceled",
            canceled_at=int(time.time()),
            ended_at=int(time.time()),
        )
        return self._event("customer.subscription.deleted", subscription, previous)

    def _invoice(self, subscription: Json, status: str) -> Json:
        invoice = {
            "id": self._id("in"),
            "object": "invoice",
            "customer": subscription["customer"],
            "status": status,
            "parent": {
                "type": "subscription_details",
                "subscription_details": {"subscription": subscription["id"], "metadata": {}},
            },
            "created": int(time.time()),
            "livemode": False,
        }
        self.invoices[invoice["id"]] = invoice
        subscription["latest_invoice"] = invoice["id"]
        return dict(invoice)

    def _event(self, type: str, obj: Json, previous: Json | None = None) -> Json:
        data: Json = {"object": json.loads(json.dumps(self._public(obj)))}
        if previous is not None:
            data["previous_attributes"] = previous
        event = {
            "id": self._id("evt"),
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": int(time.time()),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        self.events.append(event)
        return event


def _required(params: Json, name: str) -> Any:
    if name not in params or params[name] in ("", None):
        raise StripeError(400, f"Missing required param: {name}.", param=name)
    return params[name]


def _error(exc: StripeError) -> tuple[int, bytes, dict[str, str]]:
    return exc.status, json.dumps(exc.body).encode(), {}


def _fault_answer(fault: Fault) -> tuple[int, bytes, dict[str, str]]:
    if fault.status == 429:
        exc = StripeError(
            429, "Too many requests.", type="invalid_request_error", code="rate_limit"
        )
    else:
        exc = StripeError(fault.status, "An unknown error occurred.", type="api_error")
    return _error(exc)


@contextmanager
def running_fake(**options: Any) -> Iterator[FakeStripe]:
    fake = FakeStripe(**options)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
