"""Webhooks: endpoints a shop registers, events from the outbox delivered to them by the worker,
signed (``Sjaak-Signature``), retried, logged per attempt, and guarded against SSRF.

Other domains announce events with :func:`api.webhooks.events.publish`.
"""
