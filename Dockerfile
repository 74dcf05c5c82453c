# syntax=docker/dockerfile:1
#
# The `bookstore` binary in a small Debian image, running as a non-root user.
#
#   docker build -t bookstore:latest .                        # plain Kafka connections
#   docker build -t bookstore:latest --build-arg FEATURES=tls .   # TLS/SASL to Kafka (links OpenSSL)
#   docker run --rm -p 8080:8080 -e BOOKSTORE_DATABASE_URL=postgres://… bookstore:latest serve
#
# The image runs any subcommand (`relay`, `project`, `serve`, …); see docker-compose.yml.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# librdkafka is built from source by rdkafka-sys (configure + make, C/C++ toolchain), linked
# against the system zlib; OpenSSL headers are needed only with FEATURES=tls.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Everything the build reads: the manifest and lock file, the code, and what the code embeds
# at compile time (migrations through `sqlx::migrate!`, the Avro schemas through
# `include_str!`). `benches/` only because the manifest names a bench target.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY schemas ./schemas
COPY benches ./benches
ARG FEATURES=""
# The registry and the build folder live in BuildKit caches, so a rebuild after a code change
# compiles only the crate itself; the binary is copied out because caches are not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bookstore --features "${FEATURES}" \
    && install -m 0755 target/release/bookstore /usr/local/bin/bookstore

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG FEATURES=""
# ca-certificates for TLS to Kafka or PostgreSQL; libssl3 only when the binary links OpenSSL
# (FEATURES=tls). The other shared libraries it needs (zlib, libgcc_s, libc) are in the base.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
        $(case ",${FEATURES}," in (*,tls,*) echo libssl3 ;; esac) \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 bookstore \
    && useradd --system --uid 10001 --gid bookstore --home-dir /var/lib/bookstore \
        --create-home --shell /usr/sbin/nologin bookstore
COPY --from=builder /usr/local/bin/bookstore /usr/local/bin/bookstore
USER bookstore:bookstore
# The default `sqlite:bookstore.db` lands here, writable by the user; mount a volume to keep it.
WORKDIR /var/lib/bookstore
VOLUME ["/var/lib/bookstore"]
# `serve` listens on all interfaces inside the container (its own default is 127.0.0.1).
ENV BOOKSTORE_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
# The binary handles SIGTERM itself (graceful shutdown), so it can run as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bookstore"]
CMD ["--help"]
