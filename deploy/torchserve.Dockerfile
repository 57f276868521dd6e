# The kit's archives on TorchServe 0.12 (docs/deployment.md "Container images"). Build with `make image`.
#
# BASE_IMAGE: python:3.11-slim-bookworm by default (Java is then installed from Debian); `make image` here
# passes servekit-base:bookworm, built from Debian packages by deploy/base-image.sh (python3, Java 17).
# The Python packages come from a wheelhouse in the build context (`make wheelhouse`: pip on the host),
# installed with --no-index: the build needs no package index and no CA bundle of the host's.
# For NVIDIA GPUs: the torch and onnxruntime-gpu wheels are CUDA builds already; run the image with
# `--gpus all` (NVIDIA Container Toolkit) and a node with a driver for CUDA 13; nothing else changes.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS wheels
LABEL servekit.stage=wheels
COPY wheelhouse /wheelhouse
COPY deploy/requirements-serve.txt /wheelhouse/requirements-serve.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse -r /wheelhouse/requirements-serve.txt \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
RUN command -v java >/dev/null || (apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
      && rm -rf /var/lib/apt/lists/*) \
 && useradd --uid 1000 --create-home --home-dir /home/model-server --shell /usr/sbin/nologin model-server
COPY --from=wheels /opt/venv /opt/venv
COPY deploy/serve.py /opt/servekit/serve.py
COPY entry /opt/servekit/
# make tune's per-machine profiles (build/tune/profiles/ when the image was built); applied only on a machine
# with the same CPU model, flags and cores. A Kubernetes ConfigMap mounted here replaces them.
COPY profiles /home/model-server/profiles
COPY deploy/config.properties /home/model-server/config.properties
COPY model-store /home/model-server/model-store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_LOCATION=/tmp/servekit/logs \
    METRICS_LOCATION=/tmp/servekit/logs \
    TEMP=/tmp \
    SERVEKIT_DRAIN_SECONDS=60 \
    SERVEKIT_PROFILES=/home/model-server/profiles
USER 1000:1000
WORKDIR /home/model-server
EXPOSE 8080 7070 8082
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["python3", "/opt/servekit/serve.py", "--health"]
ENTRYPOINT ["python3", "/opt/servekit/serve.py"]
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config=/home/model-server/config.properties", "--model-store=/home/model-server/model-store"]
