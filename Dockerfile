# syntax=docker/dockerfile:1
# Two images from one build (docs: README "Images"):
#
#   docker build --target gateway  -t ghcr.io/kubechat/kubechat:0.1.0 .
#   docker build --target operator -t ghcr.io/kubechat/kubechat-operator:0.1.0 .
#
# The gateway image also runs the push workers (`push-worker` argument); the
# operator gets an image of its own so that it carries no chat code and the
# gateway carries no Kubernetes credentials logic. The names and the tag are
# the CRD's default gateway image (crds/src/lib.rs), the chart's
# image.repository and its appVersion; e2e/tests/image.rs fails if they part.
#
# Runtime: distroless `cc` (glibc, libgcc_s, CA certificates, /etc/passwd
# with `nonroot`), no shell, no package manager; UID/GID 65532. Nothing is
# written to the root filesystem, so it runs read-only. No HEALTHCHECK:
# Kubernetes probes /healthz and /readyz.
#
# Builder and runtime are both Debian 12 (bookworm): the binaries link against
# the glibc they run on. e2e/image/build.sh assembles the same contents
# without a container engine, from this machine's bookworm packages.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never

# Dependencies first: this layer is rebuilt only when a manifest or the lock
# file changes. Every workspace member needs its manifest and a target.
COPY Cargo.toml Cargo.lock ./
COPY config/Cargo.toml config/
COPY crds/Cargo.toml crds/
COPY redis/Cargo.toml redis/
COPY push/Cargo.toml push/
COPY operator/Cargo.toml operator/
COPY gateway/Cargo.toml gateway/
COPY e2e/Cargo.toml e2e/
COPY bench/Cargo.toml bench/
RUN for member in config crds redis push operator gateway e2e bench; do \
      mkdir -p "$member/src" && echo 'fn main() {}' >"$member/src/main.rs" && : >"$member/src/lib.rs"; \
    done \
 && cargo build --release --locked -p kubechat-gateway -p kubechat-operator \
 && rm -rf config/src crds/src redis/src push/src operator/src gateway/src e2e/src bench/src

# The sources. COPY keeps the files' own modification times, which may be
# older than the stubs above, so touch them or cargo keeps the stubs' build.
COPY config/ config/
COPY crds/ crds/
COPY redis/ redis/
COPY push/ push/
COPY operator/ operator/
COPY gateway/ gateway/
RUN find config crds redis push operator gateway -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p kubechat-gateway -p kubechat-operator \
 && mkdir -p /out \
 && cp target/release/kubechat-gateway target/release/kubechat-operator /out/ \
 && strip --strip-debug /out/kubechat-gateway /out/kubechat-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubechat-operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/kubechat-operator /usr/local/bin/kubechat-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubechat-operator"]

# Last, so that a plain `docker build .` gives the gateway image.
FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubechat" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/kubechat-gateway /usr/local/bin/kubechat-gateway
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubechat-gateway"]
