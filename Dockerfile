# The moestream image: the package and its dependencies on Python 3.11. One image runs every role: a Ray head or
# worker (`ray start`), a job submitter (`ray job submit -- moestream train ...`), the simulator, the replayer.
#
#   docker build -t moestream:latest .
#
# PyPI's torch wheels for Linux are CUDA builds that also run on CPU, so the same image serves the GPU worker
# group of infra/k8s (the node's NVIDIA driver and the device plugin provide the GPU) and CPU-only nodes.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MOESTREAM_CONFIG=/etc/moestream/moestream.yaml

WORKDIR /opt/moestream

# Dependencies first, from pyproject.toml alone, so that editing the code does not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p stream features learner serving infra benchmarks \
 && for p in stream features learner serving infra benchmarks; do touch "$p/__init__.py"; done \
 && pip install . \
 && pip uninstall -y moestream

COPY stream ./stream
COPY features ./features
COPY learner ./learner
COPY serving ./serving
COPY infra ./infra
COPY benchmarks ./benchmarks
RUN pip install --no-deps .

# The configuration the containers start with; compose and Kubernetes mount their own over it.
COPY moestream.yaml /etc/moestream/moestream.yaml

# Runs write under /data (paths.data_root in compose and Kubernetes): a volume, owned by the runtime user. So is
# Ray's temp dir, which compose shares between the Ray head and Prometheus (a new volume takes this ownership).
RUN useradd --create-home --uid 1000 moestream && mkdir -p /data /tmp/ray && chown moestream:moestream /data /tmp/ray
USER moestream

# Ray Serve's HTTP and gRPC proxies, the Ray dashboard and job API, the Ray GCS.
EXPOSE 8000 9000 8265 6379
CMD ["moestream", "--help"]
