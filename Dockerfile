# keymeter container image: `docker build -t keymeter .`
#
# Two stages: a Rust toolchain builds the release binary; the runtime is distroless
# (glibc, libgcc, CA certificates for MQTT TLS to the system roots, no shell, no
# package manager) and runs as the non-root user 65532. Deployment manifests:
# deploy/kubernetes/.

# The crate's rust-version (Cargo.toml) is 1.88, also the newest minimum of its locked
# dependencies; a newer 1.x works too (--build-arg RUST_VERSION=1.90). Keep the
# builder on Debian bookworm: the binary links against the builder's glibc, and the
# runtime below is Debian 12 (bookworm).
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build

# Dependency layer: built from the manifests alone (with stub sources), so changing
# keymeter's own code does not rebuild its ~300 dependencies. build.rs compiles the
# protos with protox (pure Rust): no protoc needed. Cargo.toml is a workspace whose other
# member (the benchmark tool, bench/tool) must exist for cargo to load it: its manifest
# and a stub main; `--bin keymeter` never builds it.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bench/tool/Cargo.toml ./bench/tool/
COPY proto ./proto
RUN mkdir src bench/tool/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/tool/src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin keymeter \
 && rm -rf src

# keymeter itself. COPY keeps the files' original mtimes, which may be older than the
# stub build above: touch them, or cargo would consider the stub binary up to date
# (and the `--help` check fails the build if it did anyway). /out/var/lib/keymeter is
# the data directory (outbox, key snapshot) for runs without a volume mounted there;
# Kubernetes mounts one.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin keymeter \
 && ./target/release/keymeter --help | grep -q -- '--config' \
 && install -D -m 0755 target/release/keymeter /out/usr/local/bin/keymeter \
 && install -d -m 0700 /out/var/lib/keymeter

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="keymeter" \
      org.opencontainers.image.description="Envoy ext_authz API-key checks and usage metering for an MQTT billing system" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/usr/local/bin/keymeter /usr/local/bin/keymeter
COPY --from=builder --chown=65532:65532 /out/var/lib/keymeter /var/lib/keymeter
# distroless' `nonroot` user, numerically, so runAsNonRoot can verify it.
USER 65532:65532
# 9191: gRPC (ext_authz Check, access log, grpc.health.v1; the keymeter.v1.Usage Report
#       API too unless listen.report is set)
# 9192: admin HTTP (/healthz, /readyz, /metrics)
# 9193: the Report API on its own port, when listen.report is set (deploy/kubernetes)
EXPOSE 9191 9192 9193
# Graceful stop: in-flight Checks finish, unsent records stay in the outbox on disk.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/keymeter"]
CMD ["--config", "/etc/keymeter/keymeter.toml"]
