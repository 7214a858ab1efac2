"""Serving on real devices: the open-loop workload, the request metrics and the pipelined engine."""
