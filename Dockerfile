# optout-relay container image.
#
#   docker build -t optout-relay .
#   docker run --rm -p 8080:8080 -e OPTOUT_RELAY__DATABASE__URL=postgres://... optout-relay
#
# Stage 1 builds a release binary; stage 2 is distroless (glibc, CA certificates,
# no shell, no package manager) running as uid 65532.

############################
# Builder
############################
FROM rust:1.95-slim-bookworm AS builder

WORKDIR /build
# bash with pipefail, so a failing command on the left of a pipe fails the RUN.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. Dependencies only, in their own layer: this is rebuilt only when
#    Cargo.toml or Cargo.lock change. Dummy lib and bin targets satisfy the
#    manifest; the exact same command as the real build compiles every
#    dependency with the same profile and features. The dummy crate's own
#    artifacts are then deleted so they can never stand in for the real ones.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin optout-relay \
    && rm -rf src \
        target/release/optout-relay \
        target/release/optout-relay.d \
        target/release/deps/optout_relay-* \
        target/release/deps/liboptout_relay-* \
        target/release/.fingerprint/optout-relay-*

# 2. The real sources. migrations/ is read at compile time by sqlx::migrate!,
#    which embeds it in the binary. COPY keeps the files' original mtimes, which
#    may be older than the dummy build, so touch them to force a rebuild; the
#    --version check fails the build if the dummy (which prints nothing) survived.
COPY src ./src
COPY migrations ./migrations
RUN find src migrations -type f -exec touch {} + \
    && cargo build --release --locked --bin optout-relay \
    && ./target/release/optout-relay --version | grep '^optout-relay ' \
    && install -D -m 0755 target/release/optout-relay /out/usr/local/bin/optout-relay \
    && mkdir -p /out/var/lib/optout-relay

############################
# Runtime
############################
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="optout-relay" \
      org.opencontainers.image.description="Relays Twilio Advanced Opt-Out (STOP/START) webhooks durably to REDCap" \
      org.opencontainers.image.licenses="MIT"

COPY --from=builder /out/usr/local/bin/optout-relay /usr/local/bin/optout-relay
# The default database is SQLite at a relative path (optout-relay.db), so the
# working directory must be writable by the runtime user. An empty directory
# copied with --chown is created owned by 65532 (distroless has no shell for
# mkdir/chown). Mount a volume here to keep the SQLite file; with PostgreSQL
# nothing is written here.
COPY --from=builder --chown=65532:65532 /out/var/lib/optout-relay /var/lib/optout-relay
WORKDIR /var/lib/optout-relay
VOLUME ["/var/lib/optout-relay"]

ENV OPTOUT_RELAY__SERVER__LISTEN=0.0.0.0:8080 \
    OPTOUT_RELAY__LOG__FORMAT=json

# distroless's "nonroot" user, numeric so runAsNonRoot checks can verify it.
USER 65532:65532

EXPOSE 8080

# No shell in the image, so exec form only. `healthcheck` requests /readyz at
# the configured listen address and exits 0 only on HTTP 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/optout-relay", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/optout-relay"]
CMD ["serve"]
