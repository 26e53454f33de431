"""The restorer: owns one host's sandboxes; prefetches, restores, falls back to cold boot, releases."""
