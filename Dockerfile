# The cluster image that cluster/kuberay-rayjob.yaml, cluster/kuberay-raycluster.yaml and
# cluster/ray-cluster.yaml name: this project with its GPU extra (vLLM 0.24.0, torch 2.11.0, Ray
# 2.60.0) and Debian's Chromium for BrowserGym, so jobs start without installing anything.
#
#   docker build -t bgrpo:0.1.0-gpu .
#   docker tag bgrpo:0.1.0-gpu REGISTRY/bgrpo:0.1.0-gpu && docker push REGISTRY/bgrpo:0.1.0-gpu
#
# (then name REGISTRY/bgrpo:0.1.0-gpu in the cluster files; README, "On a Ray cluster").
#
# Debian rather than Ray's Ubuntu images: Ubuntu's chromium package is a snap stub that does not run
# in a container, Debian's is the browser the project is tested with (/usr/lib/chromium/chromium).
# No CUDA base image is needed: the torch and vLLM wheels carry their CUDA libraries; the node
# provides the NVIDIA driver (NVIDIA container toolkit / Kubernetes device plugin). Python 3.12 is
# what the GPU extra was run with.
FROM python:3.12-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    BGRPO_CHROMIUM=/usr/lib/chromium/chromium

# chromium: BrowserGym's browsers; fonts so MiniWoB pages render as in the tests; wget and procps:
# KubeRay's health probes and `ray stop` use them; rsync, openssh-client and sudo: the Ray cluster
# launcher syncs files into the container with rsync and runs some commands with sudo.
RUN apt-get update \
 && apt-get install -y --no-install-recommends chromium fonts-liberation fonts-dejavu-core \
        wget ca-certificates procps git rsync openssh-client sudo \
 && rm -rf /var/lib/apt/lists/*

# Like Ray's own images: a user `ray` (uid 1000, home /home/ray) with passwordless sudo.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
 && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray
WORKDIR /app

# Dependencies first (a layer that survives code edits), then the code, installed editable (the
# presets are found by name in /app/cluster/presets).
COPY pyproject.toml README.md ./
RUN mkdir -p actors learner cluster envs \
 && pip install ".[gpu]" \
 && pip uninstall -y bgrpo
COPY . .
RUN pip install --no-deps -e ".[gpu]" \
 && mkdir -p /runs && chown -R ray:ray /app /runs

USER ray
# KubeRay and the cluster launcher run `ray start ...` themselves; a plain `docker run` gets the CLI.
CMD ["bgrpo", "--help"]
