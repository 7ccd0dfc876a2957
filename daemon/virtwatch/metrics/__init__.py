"""Prometheus metrics: names, collector, self-instrumentation, HTTP."""
