# The snapscale image: the scaler, restorer and freezer, with CRIU 4.2.1 in /app/.criu.
# It runs the repository's own scripts/setup (the same steps as a developer machine and CI), so
# the CRIU prefix and the Python environment are the tested ones. GPU hosts need the NVIDIA
# container toolkit on the host (driver >= 570 for the CUDA checkpoint API); the driver's
# libcuda is mounted in at run time, never baked in.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# iproute2 (network namespaces), util-linux (nsenter/unshare), procps (pgrep for the
# healthcheck), and what scripts/setup uses to fetch CRIU's .debs from Debian unstable.
# The OCI sandbox (docs/sandbox.md): runc runs and checkpoints the workloads' containers, skopeo
# fetches their images by digest, umoci unpacks them, iptables is CRIU's network lock in runc's
# checkpoints.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends \
        iproute2 util-linux procps ca-certificates debian-archive-keyring \
        runc skopeo umoci iptables \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first: this layer is rebuilt only when pyproject.toml or the setup script change.
COPY pyproject.toml README.md* ./
COPY scripts/ scripts/
COPY snapscale/ snapscale/
RUN ./scripts/setup && rm -rf /root/.cache

COPY examples/ examples/
COPY compose/gpu-host.sh compose/gpu-host.sh

ENV PATH=/app/.venv/bin:/app/.criu/bin:$PATH \
    SNAPSCALE_CRIU=/app/.criu/bin/criu \
    SNAPSCALE_STATE_DIR=/var/lib/snapscale \
    SNAPSCALE_CACHE_DIR=/var/cache/snapscale

CMD ["snapscale", "--help"]
