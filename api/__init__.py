"""Sjaak: a multi-tenant customer-journey API for web shops."""
