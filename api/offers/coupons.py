"""Redeeming an offer's code (over the API or with a purchase) and giving it back on a refund."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec

from api.db import TenantConn
from api.errors import PROBLEM_TYPES, Problem, ProblemType
from api.loyalty import ledger
from api.loyalty.ledger import Source
from api.loyalty.program import current_program, expires_at
from api.offers.campaigns import Reward, get
from api.offers.decide import _OFFER_COLUMNS, OfferView, offer_view
from api.webhooks.events import publish

NOT_REDEEMABLE = "offer-not-redeemable"
PROBLEM_TYPES[NOT_REDEEMABLE] = ProblemType(
    NOT_REDEEMABLE,
    409,
    "Offer cannot be redeemed",
    "The code exists but cannot be redeemed now: it was redeemed already (with another order), "
    "it expired, or the campaign's redemption budget is spent. `detail` says which.",
)


@dataclass(frozen=True)
class OrderFacts:
    """What the redeeming order says, when there is one (amounts in minor units)."""

    order_id: str | None = None
    amount: int | None = None
    currency: str | None = None
    shipping: int = 0


def discount_of(reward: Reward, order: OrderFacts) -> int:
    """What the offer saves on this order (0 when the order is not known)."""
    if order.amount is None:
        return 0
    if reward.type == "percent_off" and reward.percent is not None:
        return order.amount * reward.percent // 100
    if reward.type == "amount_off" and reward.amount is not None:
        return min(reward.amount, order.amount) if order.currency == reward.currency else 0
    if reward.type == "free_shipping":
        return order.shipping
    return 0


async def redeem(
    conn: TenantConn,
    code: str,
    customer_ref: int,
    order: OrderFacts,
    now: datetime,
    schema: str,
) -> OfferView:
    """Redeem ``code`` for ``customer_ref``; a repeat with the same order answers the same."""
    row = await conn.fetchrow(
        f"SELECT {_OFFER_COLUMNS}, o.customer_ref FROM offers o"
        " JOIN customers c ON c.id = o.customer_ref WHERE o.code = $1 FOR UPDATE OF o",
        code,
    )
    # Another customer's code is reported as unknown: codes are not to be probed.
    if row is None or row["customer_ref"] != customer_ref:
        raise Problem("not-found", f"No offer {code} for this customer.")
    offer = offer_view(row, now)
    if offer.status == "redeemed":
        if order.order_id is not None and offer.redeemed_order_id == order.order_id:
            return offer
        raise Problem(NOT_REDEEMABLE, f"Offer {code} was redeemed at {offer.redeemed_at}.")
    if offer.status == "expired":
        raise Problem(NOT_REDEEMABLE, f"Offer {code} expired at {offer.expires_at}.")
    campaign = await get(conn, offer.campaign_id)
    limits = campaign.spec.limits
    discount = discount_of(offer.reward, order)
    taken = await conn.fetchval(
        "UPDATE campaigns SET redeemed_count = redeemed_count + 1,"
        " discount_total = discount_total + $4 WHERE id = $1"
        " AND ($2::bigint IS NULL OR redeemed_count < $2)"
        " AND ($3::bigint IS NULL OR discount_total + $4 <= $3) RETURNING id",
        campaign.id,
        limits.max_redeemed,
        limits.max_discount,
        discount,
    )
    if taken is None:
        raise Problem(NOT_REDEEMABLE, f"Campaign {campaign.id}'s redemption budget is spent.")
    await conn.execute(
        "UPDATE offers SET redeemed_at = $2, redeemed_order_id = $3, discount = $4 WHERE id = $1",
        offer.id,
        now,
        order.order_id,
        discount,
    )
    await _reward_points(conn, offer, customer_ref, order, now, schema)
    redeemed = msgspec.structs.replace(
        offer,
        status="redeemed",
        redeemed_at=now,
        redeemed_order_id=order.order_id,
        discount=discount,
    )
    await publish(
        conn, "offer.redeemed", msgspec.to_builtins(redeemed), customer_ref, occurred_at=now
    )
    return redeemed


async def _reward_points(
    conn: TenantConn,
    offer: OfferView,
    ref: int,
    order: OrderFacts,
    now: datetime,
    schema: str,
) -> None:
    """Bonus points, or the extra points of a multiplier on the order's earned points, as an
    earning in the ledger (once per offer, whatever is re-sent)."""
    reward = offer.reward
    points = 0
    if reward.type == "bonus_points" and reward.points:
        points = reward.points
    elif reward.type == "points_multiplier" and reward.multiplier_percent and order.order_id:
        earned = await conn.fetchval(
            "SELECT coalesce(sum(lifetime_delta), 0) FROM loyalty_entries"
            " WHERE kind = 'earn' AND order_id = $1 AND customer_ref = $2",
            order.order_id,
            ref,
        )
        points = earned * (reward.multiplier_percent - 100) // 100
    if points <= 0:
        return
    account = await ledger.lock_account(conn, ref)
    key = f"earn:offer:{offer.id}"
    if await ledger.seen(conn, [key]):
        return
    program = await current_program(conn, schema)
    ledger.add_lot(
        account,
        points,
        kind="earn",
        source=Source(
            reason=f"offer {offer.code} redeemed",
            order_id=order.order_id,
            dedupe_key=key,
        ),
        at=now,
        now=now,
        activates_at=now,
        expires_at=expires_at(program, now),
        lifetime=True,
    )
    await ledger.save(conn, [account])


async def give_back(conn: TenantConn, order_id: str, ref: int, now: datetime) -> int:
    """A refund of the whole order un-redeems the offers it redeemed (they can be used again
    until they expire, and count against the budget no longer); returns how many."""
    given_back: int = await conn.fetchval(
        """
        WITH old AS (
            SELECT id, campaign_id, coalesce(discount, 0) AS discount FROM offers
            WHERE redeemed_order_id = $1 AND customer_ref = $2 FOR UPDATE
        ),
        offers_back AS (
            UPDATE offers o SET redeemed_at = NULL, redeemed_order_id = NULL, discount = NULL
            FROM old WHERE o.id = old.id
        ),
        budgets AS (
            UPDATE campaigns c SET redeemed_count = c.redeemed_count - g.n,
                discount_total = c.discount_total - g.d
            FROM (SELECT campaign_id, count(*) AS n, sum(discount) AS d FROM old
                  GROUP BY campaign_id) AS g
            WHERE c.id = g.campaign_id
        )
        SELECT count(*) FROM old
        """,
        order_id,
        ref,
    )
    return given_back
