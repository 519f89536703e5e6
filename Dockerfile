# syntax=docker/dockerfile:1
# kvtier services image: the cache server (`kvtier server`), the cluster controller (`kvtier controller`)
# and the KV-aware router (`kvtier router`). CPU only; no inference engine inside (engines use
# Dockerfile.vllm or their own image with kvtier installed).
#
#   docker build -t kvtier:0.1.0 .
#   docker run --rm -p 127.0.0.1:7390:7390 -e KVTIER_SERVER__TOKEN_FILE=/run/secrets/kvtier_token \
#       -v "$PWD/token:/run/secrets/kvtier_token:ro" kvtier:0.1.0 server --host 0.0.0.0
#
# Every service binds 127.0.0.1 unless told otherwise; a non-loopback bind is refused without a token.
# Tokens come from the environment (KVTIER_SERVER__TOKEN, KVTIER_CONTROLLER_TOKEN, KVTIER_ROUTER_TOKEN)
# or, through deploy/docker-entrypoint.sh, from a secret file named by the same variable + _FILE.
# Ports: 7390 cache server, 9000 controller, 8080 router. Runs as the unprivileged user 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
# the build context is filtered by .dockerignore: pyproject.toml, README.md, LICENSE, kvtier/
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
# CPU build of torch (the controller and router import it); any index with torch wheels works
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=wheel /dist /dist
# the wheel is the one just built; its dependencies are the ranges pyproject.toml declares
# hadolint ignore=DL3013
RUN for wheel in /dist/kvtier-*.whl; do \
        pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "${wheel}[redis,router]"; \
    done \
    && rm -rf /dist \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/kvtier --create-home kvtier
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/kvtier-entrypoint

USER 10001:10001
WORKDIR /var/lib/kvtier
ENV PYTHONUNBUFFERED=1
EXPOSE 7390 9000 8080
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/kvtier-entrypoint", "kvtier"]
CMD ["--help"]
