"""Baton: execute and monitor multi-step workflow runs."""
