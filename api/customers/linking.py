"""Identify (an anonymous visitor is this customer) and merge (two customers are one person)."""

from __future__ import annotations

from api.db import TenantConn
from api.errors import FieldError, Problem
from api.touchpoints import identity
from api.touchpoints.schemas import is_placeholder


def checked_id(value: str, path: str) -> str:
    """Placeholder ids (``""``, ``"null"``, ``"undefined"``, ``"0"`` …) would merge strangers."""
    if is_placeholder(value):
        raise Problem(
            "validation",
            f"{value!r} is a placeholder, not an id.",
            errors=[FieldError(path, f"{value!r} is a placeholder, not an id")],
        )
    return value


async def identify(conn: TenantConn, anonymous_id: str, customer_id: str) -> int:
    """Tie ``anonymous_id`` to ``customer_id``; returns the customer's profile ref.

    The anonymous history (and anything sent later under that id) joins the customer. Repeating
    the call changes nothing. An anonymous id that already belongs to a *different* known customer
    is a conflict: two known customers are merged only by :func:`merge`.
    """
    customer_key = ("customer_id", customer_id)
    anonymous_key = ("anonymous_id", anonymous_id)
    await identity.lock_ids(conn, [customer_key, anonymous_key])
    resolved = await identity.resolve(conn, [customer_key, anonymous_key])
    customer = resolved.refs.get(customer_key)
    anonymous = resolved.refs.get(anonymous_key)
    if anonymous is not None and anonymous in resolved.known and anonymous != customer:
        raise Problem(
            "conflict",
            f"The anonymous id {anonymous_id!r} already belongs to another known customer; "
            "merge the two customers explicitly if they are one person.",
        )
    if customer is None and anonymous is not None:
        await identity.make_known(conn, anonymous, customer_id)
        return anonymous
    if customer is None:
        [customer] = await identity.new_profile_refs(conn, 1)
        await identity.create_profiles(conn, [(customer, customer_id)])
        await identity.add_identities(conn, [("customer_id", customer_id, customer)])
    if anonymous is None:
        await identity.add_identities(conn, [("anonymous_id", anonymous_id, customer)])
    elif anonymous != customer:
        await identity.absorb(conn, anonymous, customer)
    return customer


async def merge(conn: TenantConn, survivor_id: str, absorbed_id: str) -> int:
    """Fold the customer ``absorbed_id`` into ``survivor_id``; the absorbed id keeps resolving to
    the survivor on read and write. Returns the survivor's ref."""
    survivor_key = ("customer_id", survivor_id)
    absorbed_key = ("customer_id", absorbed_id)
    await identity.lock_ids(conn, [survivor_key, absorbed_key])
    resolved = await identity.resolve(conn, [survivor_key, absorbed_key])
    survivor = resolved.refs.get(survivor_key)
    absorbed = resolved.refs.get(absorbed_key)
    if survivor is None:
        raise Problem("not-found", f"No customer {survivor_id}.")
    if absorbed is None:
        raise Problem(
            "validation",
            f"No customer {absorbed_id} to merge.",
            errors=[FieldError("$.customer_id", "no such customer")],
        )
    await identity.absorb(conn, absorbed, survivor)
    return survivor
