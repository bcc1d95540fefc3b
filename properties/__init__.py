"""Hypothesis strategies and property suites: the fuzz suite of matsim."""
