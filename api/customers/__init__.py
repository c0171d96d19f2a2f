"""Customers: profiles, traits and timelines.

Other domains reach a customer through :func:`resolve_customer_ref`, which follows merges to the
surviving profile; the HTTP surface is :class:`api.customers.routes.CustomerController`.
"""

from api.customers.profiles import resolve_customer_ref

__all__ = ["resolve_customer_ref"]
