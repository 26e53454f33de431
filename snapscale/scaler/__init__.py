"""The scaler: traffic in, replicas out. Pure decisions in policy/placement, I/O in the service."""
