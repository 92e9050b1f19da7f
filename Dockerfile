# wmvae daemon image: built against PyPI's torch 2.11 (libtorch for tch 0.24,
# CUDA 13 libraries included, so the same image uses a GPU when compose
# reserves one), shipped with the binary and just the libraries it loads.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/setup && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
# Keep site-packages' layout: libtorch_cuda finds the CUDA libraries at
# $ORIGIN/../../nvidia through its own RUNPATH.
COPY --from=build /src/.venv/lib/python3.11/site-packages/torch/lib /opt/site-packages/torch/lib
COPY --from=build /src/.venv/lib/python3.11/site-packages/nvidia /opt/site-packages/nvidia
ENV LD_LIBRARY_PATH=/opt/site-packages/torch/lib
COPY --from=build /src/target/release/wmvae /usr/local/bin/wmvae
# `wmvae bench ...` runs the wmvae-bench beside wmvae (crates/bench).
COPY --from=build /src/target/release/wmvae-bench /usr/local/bin/wmvae-bench
COPY config /etc/wmvae
VOLUME /data
EXPOSE 9464
ENTRYPOINT ["wmvae"]
CMD ["serve", "--config", "/etc/wmvae/compose.toml"]
