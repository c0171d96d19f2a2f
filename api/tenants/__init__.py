"""Shops: provisioning, suspension, deletion."""
