# syntax=docker/dockerfile:1
# Image of the chunking sidecar beside vLLM (tokenslice sidecar).
# Build from the repository root:  docker build -f docker/sidecar.Dockerfile -t ghcr.io/tokenslice/sidecar:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tokenslice tokenslice
COPY sidecar sidecar
COPY gateway_ext gateway_ext
COPY operator operator
# the tokenslice wheel alone; its dependencies come from the group below
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
# only this part's dependency group (pyproject.toml [project.optional-dependencies] sidecar)
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    sh -c 'pip install --no-cache-dir "$(ls /wheels/tokenslice-*.whl)[sidecar]"'
# distroless-style nonroot uid; the chart runs with a read-only root filesystem
USER 65532:65532
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
ENTRYPOINT ["tokenslice"]
CMD ["sidecar"]
