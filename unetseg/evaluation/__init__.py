"""Scoring predictions against annotations (`metrics`), and searching post-processing on them (`tune`)."""
