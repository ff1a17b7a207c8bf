# The GPU image: CUDA 12, Python 3.11, jax[cuda12] at the version of the CPU pin in
# requirements.txt, the pinned requirements and dwise_jax (see the README's GPU section).
#
#   docker build -t dwise_jax .
#   docker run --rm --gpus all dwise_jax                      # prints the GPUs JAX sees
#   docker run --rm -it --gpus all --ipc=host \
#       -v /big/disk/sensorium:/data -v /big/disk/workdir:/workdir dwise_jax bash
#
# The CUDA and cuDNN libraries come as the pip wheels that jax[cuda12] pins, the versions JAX
# was built against, so the base image is CUDA's small "base" flavour (driver hook-up and
# cudart) rather than a second copy of the libraries in "runtime"/"cudnn". The host needs an
# NVIDIA driver for CUDA 12 and the NVIDIA Container Toolkit.
FROM nvidia/cuda:12.6.3-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LOG_DIR=/workdir/logs \
    DWISE_JAX_CACHE=/workdir/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from the deadsnakes PPA: Ubuntu 22.04's own python3 is 3.10. The apt packages
# are left unpinned (the PPA keeps only its latest builds); the Python packages are pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent \
        software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/dwise_jax

# The pinned dependencies first, so that a code change does not reinstall them. jax[cuda12]
# adds the CUDA plugin and libraries to the jax and jaxlib pins of requirements.txt.
COPY requirements.txt ./
RUN pip install -r requirements.txt "jax[cuda12]==0.10.2"

COPY pyproject.toml README.md ./
COPY dwise_jax ./dwise_jax
RUN pip install --no-deps .
COPY configs ./configs
COPY launch ./launch

# /data: the dataset root's parent (python -m dwise_jax.data.download --root
# /data/sensorium_all_2023); /workdir: checkpoints, predictions, reports, launch logs and
# the folds cache (the video hashes, kept across containers).
VOLUME ["/data", "/workdir"]

CMD ["python", "-c", "import jax; print('dwise_jax image: jax', jax.__version__, jax.devices())"]
