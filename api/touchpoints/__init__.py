"""Touchpoints: ingest (single and batch), validation, identity resolution."""
