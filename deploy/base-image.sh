#!/usr/bin/env bash
# A Debian bookworm base image from Debian's packages (no registry needed): python3 with venv and its
# shared library (the Triton python stub links it), Java 17 for TorchServe's frontend, CA certificates.
# Usage: deploy/base-image.sh [tag]   (default servekit-base:bookworm)
set -euo pipefail
TAG="${1:-servekit-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=python3,python3-venv,libpython3.11,openjdk-17-jre-headless,ca-certificates,libgomp1,procps
mmdebstrap --variant=minbase --include="$PACKAGES" \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm - "$MIRROR" \
  | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG"
docker image inspect --format '{{.Id}} {{.Size}}' "$TAG"
