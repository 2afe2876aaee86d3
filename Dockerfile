# syntax=docker/dockerfile:1
#
# One image holding all three Switchyard binaries:
#   /usr/local/bin/switchyard-gateway        (the default entrypoint)
#   /usr/local/bin/switchyard-router-shard
#   /usr/local/bin/switchyard-persistor
#
# Why one image and not one per binary: the three share almost every dependency, so one release build compiles
# the dependency graph once; a deploy rolls one tag, so gateways, router shards and persistors can never run
# mismatched protocol versions; and the extra binaries cost a few MB in a layer every node caches once. The Helm
# chart and the kustomize manifests pick the binary with `command:`.
#
# Build:   docker build --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t switchyard:0.1.0 .
#          (.git stays out of the build context; GIT_COMMIT is what `--version` and switchyard_build_info show)
# Run:     docker run --rm -p 8080:8080 -e SWITCHYARD_LISTEN=0.0.0.0:8080 -e SWITCHYARD_ADMIN_TOKEN=... switchyard:0.1.0
#          docker run --rm --entrypoint /usr/local/bin/switchyard-router-shard switchyard:0.1.0
#
# The runtime image is distroless (glibc, libgcc, CA certificates, nothing else; no shell), running as the
# unprivileged uid 65532. No binary links OpenSSL. Because there is no `sleep` binary, the gateway's drain delay
# uses the Kubernetes preStop `sleep` action (Kubernetes 1.30+). For a debuggable image with a shell, build with
#   --build-arg RUNTIME_IMAGE=debian:bookworm-slim
# (same glibc as the builder; the numeric USER below works without a passwd entry).

ARG RUST_VERSION=1.95
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:${RUST_VERSION}-bookworm AS builder
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
WORKDIR /src
COPY . .
# The registry, git checkouts and target/ live in BuildKit cache mounts, so a rebuild after a source change only
# recompiles the workspace crates. target/ is not part of the image layer, so the binaries are copied out in the
# same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        -p switchyard-gateway -p switchyard-router-shard -p switchyard-persistor \
    && mkdir -p /out \
    && cp target/release/switchyard-gateway \
          target/release/switchyard-router-shard \
          target/release/switchyard-persistor /out/

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=builder /out/ /usr/local/bin/
# No SWITCHYARD_* settings here: each binary refuses variables it does not know, and the image serves all three.
# The gateway's own default listen address (127.0.0.1:8080) is unreachable from outside a container, so the chart and
# the manifests set SWITCHYARD_LISTEN, and so does `docker run` (above).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/switchyard-gateway"]
