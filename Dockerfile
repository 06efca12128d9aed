# The image the Helm charts under deploy/helm run (`deployment.image`: ghcr.io/ferry-connectivity/ferry):
# the `ferry` binary as /usr/local/bin/ferry, on the PATH the charts' `command: ["ferry", ...]` uses,
# running as uid/gid 65532, the charts' `securityContext.runAsUser`; no shell, no package manager.
#
#   docker build -t ghcr.io/ferry-connectivity/ferry:0.1.0 .
#
# scripts/helm.sh checks that these facts and the charts agree (it builds no image).

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
# aws-lc-rs (TLS, JWT) builds its C part with cmake and clang.
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferry \
    && install -D -m 0755 target/release/ferry /out/ferry

# glibc, libgcc and the CA bundle (for outbound TLS to token services and backends), user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ferry /usr/local/bin/ferry
USER 65532:65532
ENTRYPOINT ["ferry"]
CMD ["--help"]
