"""What every snapscale service needs: settings, wire formats, NATS helpers, telemetry.

Nothing here imports a service (an import-linter contract checks it).
"""
