"""Fault tolerance: failure injection, heartbeat-based detection, pluggable recovery strategies."""
