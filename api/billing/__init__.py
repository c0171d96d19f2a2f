"""Billing: plans, the shop's subscription as Stripe reports it, usage counting and quotas, meter
events to Stripe, and Stripe's webhooks. Stripe is reached only through :mod:`stripe_client`."""
