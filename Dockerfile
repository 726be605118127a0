# syntax=docker/dockerfile:1
#
# One image for every Tally process (tally-shard, tally-coordinator, tallyctl):
# docker-compose.yml picks the binary per service with `command:`.
#
#   docker build -t tally:dev .
#   docker compose up --build

# Any official Rust >= 1.89 (the workspace's rust-version) on bookworm works;
# bookworm matches the runtime stage's glibc.
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# The whole workspace is needed, not just the three crates: cargo reads every
# member's manifest (the root package's src/ and benches/ included), and
# tally-proto's build.rs compiles proto/ with protox, so no protoc is needed.
COPY . .
# Cache mounts keep downloaded crates and compiled dependencies between
# builds. target/ lives only in the cache mount, so the binaries must be copied
# out of it in this same RUN, before the mount goes away.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tally-shard -p tally-coordinator -p tally-cli \
    && mkdir -p /out \
    && cp target/release/tally-shard target/release/tally-coordinator target/release/tallyctl /out/

FROM debian:bookworm-slim
# No apt packages: the binaries link only glibc and libgcc_s, both in the slim
# base (no OpenSSL: TLS is rustls, built in).
#
# /data is owned by `tally` in the image so that a new, empty named volume
# mounted there inherits that ownership and the non-root user can write to it.
RUN groupadd --system tally \
    && useradd --system --gid tally --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin tally \
    && mkdir -p /data /secrets /ca \
    && chown tally:tally /data /secrets /ca
COPY --from=builder /out/ /usr/local/bin/
USER tally
WORKDIR /data
ENV RUST_LOG=info
# 7700: coordinator (public API); 7701-7703: the compose file's shards.
EXPOSE 7700 7701 7702 7703
# No VOLUME line: it would leave an anonymous volume behind on every
# `docker run`; compose mounts a named volume per shard instead.
# No ENTRYPOINT, so `command:` (or `docker run tally:dev tallyctl ...`) gives
# the full argv. Run daemons with an init (`init: true` in compose, or
# `docker run --init`), which forwards signals and reaps children.
CMD ["tallyctl", "--help"]
