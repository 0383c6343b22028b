"""Asset checks (visible in the UI beside each asset)."""
