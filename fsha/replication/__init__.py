"""Replication between nodes: the replicated state (no I/O) and the mTLS peer links."""
