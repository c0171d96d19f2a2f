"""Journey analytics (``analytics:read``): the funnel, the paths to a first purchase, attribution
of purchases to channels and campaigns, and the flow between stages.

Every figure is one set-based SQL statement in the shop's own schema (the tenant transaction's
search path), so one shop's data can never enter another's figures. The common filters are a
period (``from`` inclusive, ``to`` exclusive; the last 90 days by default) and the customers'
acquisition channel (the channel of their first touchpoint); see :mod:`api.analytics.filters`.
"""

from api.analytics.routes import analytics_routes

__all__ = ["analytics_routes"]
