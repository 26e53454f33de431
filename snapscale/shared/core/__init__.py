"""The core: errors, settings, runtime, telemetry, file and wire helpers. Imports nothing else of
snapscale; every other package may import its modules directly."""
