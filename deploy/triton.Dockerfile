# The kit's generated Triton repository with the packages its python steps import (docs/deployment.md "Container images").
#
# Built here (`make image`): BASE_IMAGE=servekit-base:bookworm (Debian packages, deploy/base-image.sh), the
# CPU repository (model_repository/cpu: python-backend ONNX Runtime) staged as `repository/` in the build
# context, and the tritonserver that nvidia-pytriton bundles (2.51, python backend), from the wheelhouse.
# For NVIDIA GPUs, what differs: BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3 (Triton 2.51, its own
# onnxruntime and python backends, Ubuntu 22.04 with Python 3.10), the GPU repository (KIND_GPU, TensorRT
# FP16: `scripts/deploy/images.py build --which triton --repository model_repository/gpu --base <that image>`), a
# wheelhouse for that Python (`make wheelhouse WHEEL_PYTHON=3.10`), and `docker run --gpus all`. The
# entrypoint then runs NVIDIA's /opt/tritonserver/bin/tritonserver itself.
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${BASE_IMAGE} AS wheels
LABEL servekit.stage=wheels
COPY wheelhouse /wheelhouse
COPY deploy/requirements-triton.txt /wheelhouse/requirements-triton.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse -r /wheelhouse/requirements-triton.txt \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
RUN id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /usr/sbin/nologin triton
COPY --from=wheels /opt/venv /opt/venv
COPY deploy/tritonserver.py scripts/tritonctl.py scripts/tsctl.py /opt/servekit/
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1
RUN python3 /opt/servekit/tritonserver.py --prepare
COPY repository /models
USER 1000
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["python3", "/opt/servekit/tritonserver.py", "--health"]
ENTRYPOINT ["python3", "/opt/servekit/tritonserver.py"]
CMD ["--model-repository=/models", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--exit-timeout-secs=60"]
