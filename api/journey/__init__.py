"""Journey stages: rules, evaluation on ingest, transitions, drift."""
