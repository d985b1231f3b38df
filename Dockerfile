# syntax=docker/dockerfile:1
#
# BLOOM runtime image: bloom-api, bloom-reconciler, bloom-worker and bloomctl in
# /usr/local/bin, running as the non-root user 65532 (nonroot). The Helm chart in
# helm/bloom-runtime picks the binary with the container command.
#
#   docker build -t bloom-runtime:0.1.0 .
#   docker run --rm -e BLOOM_ENV=production -e RUNTIME_API_KEY=x bloom-runtime:0.1.0 bloom-api --check-config
#
# The runtime stage is debian:bookworm-slim rather than distroless because the worker's
# command executor runs BLOOM_EXECUTOR_COMMAND through `sh -c`. The Claude CLI is not
# included: build a worker image on top of this one (see helm/bloom-runtime/README.md).

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# Only what the binaries are built from: migrations/ and nats/ are compiled in
# (sqlx::migrate!, include_str!).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bin ./bin
COPY migrations ./migrations
COPY nats ./nats

RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && for b in bloom-api bloom-reconciler bloom-worker bloomctl; do \
      install -m 0755 "target/release/$b" "/out/$b"; \
    done

# ---------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bloom-runtime" \
      org.opencontainers.image.description="BLOOM runtime: NATS JetStream + Postgres task dispatcher (bloom-api, bloom-reconciler, bloom-worker, bloomctl)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# CA certificates for TLS to S3, membridge, Postgres and NATS; a fixed non-root user
# 65532 (the distroless "nonroot" convention) with a home for the worker's executor.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home \
      --shell /usr/sbin/nologin nonroot

COPY --from=builder /out/bloom-api /out/bloom-reconciler /out/bloom-worker /out/bloomctl /usr/local/bin/

ENV HOME=/home/nonroot
WORKDIR /home/nonroot
USER 65532:65532

# bloom-api, bloom-reconciler, bloom-worker HTTP ports.
EXPOSE 3002 9090 9091
CMD ["/usr/local/bin/bloom-api"]
