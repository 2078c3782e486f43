# albert-serve: ALBERT models over HTTP on JAX/Flax.
#
#   docker build -t albert-serve .                                   # CPU (default)
#   docker build --build-arg ACCELERATOR=cuda12 -t albert-serve:cuda12 .   # NVIDIA GPU: JAX's CUDA 12 wheels
#
# The CUDA variant needs no CUDA base image: `jax[cuda12]` brings the CUDA libraries as pip wheels; the
# host provides only the NVIDIA driver (NVIDIA Container Toolkit; `--gpus all`, or the compose gpu profile).
# Only the runtime dependencies of pyproject.toml are installed: never torch or transformers.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a virtual environment with the dependencies and the project --------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG ACCELERATOR=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that editing the code does not reinstall them. For the
# CUDA variant the same `jax` requirement gets the cuda12 extra, so the version range stays in one place.
COPY pyproject.toml ./
RUN case "$ACCELERATOR" in cpu|cuda12) ;; *) echo "ACCELERATOR must be cpu or cuda12, got '$ACCELERATOR'" >&2; exit 1;; esac \
 && python -c 'import re, sys, tomllib; extra = sys.argv[1]; \
[print(r if extra == "cpu" else re.sub(r"^jax(?![\w-])", f"jax[{extra}]", r)) \
 for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]' "$ACCELERATOR" \
    > /tmp/requirements.txt
RUN cat /tmp/requirements.txt && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY model ./model
COPY service ./service
RUN pip install --no-deps . \
 && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers')))"

# --- runtime: the virtual environment only, run as an unprivileged user ------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG ACCELERATOR=cpu
LABEL org.opencontainers.image.title="albert-serve" \
      org.opencontainers.image.description="ALBERT models over HTTP on JAX/Flax: /classify, /fill-mask, /qa, /ner" \
      org.opencontainers.image.licenses="Apache-2.0" \
      albert-serve.accelerator="${ACCELERATOR}"

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it; /data holds the two caches (mount volumes
# there to keep downloads and compiled programs across restarts).
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/albert --shell /usr/sbin/nologin albert \
 && mkdir -p /data/huggingface /data/jax-cache \
 && chown -R 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/huggingface \
    ALBERT_COMPILATION_CACHE_DIR=/data/jax-cache \
    ALBERT_HOST=0.0.0.0 \
    ALBERT_PORT=8000

USER 10001:10001
WORKDIR /home/albert
EXPOSE 8000

# Optional warm start: `--build-arg PRECOMPILE=true` runs `albert-serve compile` at build time, so the image
# carries every model's compiled grid and bucket costs in /data/jax-cache (and the checkpoints, downloaded
# at build time, in /data/huggingface): a container is ready in seconds and never compiles. The build sees
# the same ALBERT_* variables (pass them with --build-arg, e.g. ALBERT_NER_MODEL=). Compiled CPU code is
# specific to the CPU it was compiled on: build on the kind of machine that runs the image (elsewhere the
# cache only misses: the server compiles, as without it).
ARG PRECOMPILE=false
ARG ALBERT_CLASSIFY_MODEL
ARG ALBERT_FILL_MASK_MODEL
ARG ALBERT_QA_MODEL
ARG ALBERT_NER_MODEL
ARG ALBERT_MODELS_FILE
ARG ALBERT_DTYPE
RUN case "$PRECOMPILE" in false) ;; true) albert-serve compile ;; \
      *) echo "PRECOMPILE must be true or false, got '$PRECOMPILE'" >&2; exit 1 ;; esac

# Healthy once every model is loaded and every bucket compiled (/ready is 200). Compiling the default grid
# of four base-size models takes minutes on a small CPU, hence the long start period. python, not curl (the
# slim base has no curl); written without spaces because podman's Docker API splits healthcheck arguments
# on whitespace.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "-c", "__import__('urllib.request').request.urlopen('http://127.0.0.1:%s/ready'%__import__('os').environ.get('ALBERT_PORT','8000'),timeout=4)"]

# No ENTRYPOINT, so other commands run as easily: `docker run ... albert-serve-demo` serves demo models.
CMD ["albert-serve"]
