"""Evaluation: text metrics and the report."""
