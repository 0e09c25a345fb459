# syntax=docker/dockerfile:1
# vdm-serve container image (CPU): vdm-server, vdm-client and vdm-train on
# Debian bookworm, serving the shipped model model/checkpoints/fmnist.pt.
#
#   docker build -t vdm-serve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 vdm-serve:0.1.0
#   docker run --rm --network=host --entrypoint=vdm-client vdm-serve:0.1.0 \
#       --target=localhost:50051 health
#
# Any vdm-server flag can follow the image name, e.g. --threads=4, or
# --model=/models/my.pt with -v "$PWD/models:/models:ro".
# The CUDA variant is Dockerfile.cuda (not built here: no GPU). This image is
# built and run for real by scripts/container-check.sh (podman; not in CI);
# tests/deploy/check_dockerfile.sh checks it statically in every test run.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---- build: the same Debian packages as a developer machine ----------------
FROM ${DEBIAN_IMAGE} AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY CMakeLists.txt ./
COPY proto proto
COPY model model
COPY server server
COPY client client
# CMakeLists.txt names targets in bench/ and tools/ too.
COPY bench bench
COPY tools tools
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DVDM_BUILD_TESTS=OFF \
 && cmake --build build -j"$(nproc)" --target vdm-server vdm-client vdm-train \
 && strip --strip-debug build/vdm-server build/vdm-client build/vdm-train

# ---- runtime: the binaries, their shared libraries, the model ---------------
FROM ${DEBIAN_IMAGE} AS runtime
# The runtime halves of the -dev packages the build links (tests/deploy keeps
# this list in step with the binaries' NEEDED libraries). libopenblas0-pthread
# is installed first so that it, not the reference BLAS, provides libblas.so.3
# for libtorch (about 50x faster fp32 matmul).
ARG RUNTIME_PACKAGES="libtorch1.13 libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libprometheus-cpp-core1.0 libcpp-httplib0.11 libssl3 libgoogle-glog0v6 libpng16-16 zlib1g"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libopenblas0-pthread \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${RUNTIME_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/vdm-server /src/build/vdm-client /src/build/vdm-train /usr/local/bin/
# Fail the build if any shared library is missing.
RUN set -e; for b in vdm-server vdm-client vdm-train; do \
      if ldd "/usr/local/bin/$b" | grep 'not found'; then echo "$b: missing libraries" >&2; exit 1; fi; \
    done
RUN groupadd --system --gid 10001 vdm \
 && useradd --system --uid 10001 --gid vdm --home-dir /opt/vdm --no-create-home \
      --shell /usr/sbin/nologin vdm
# vdm-server's default --model is model/checkpoints/fmnist.pt, relative to
# the working directory.
WORKDIR /opt/vdm
COPY model/checkpoints/fmnist.pt model/checkpoints/fmnist.pt
# Its anomaly calibration (vdm-calibrate), which vdm-server loads from beside
# the model.
COPY model/checkpoints/fmnist.pt.calibration.json model/checkpoints/fmnist.pt.calibration.json
# The thorough anomaly level's feature network, also found beside the model.
COPY model/checkpoints/fmnist.pt.features.pt model/checkpoints/fmnist.pt.features.pt
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["vdm-client", "--target=localhost:50051", "--timeout_s=3", "--max_attempts=1", "health"]
ENTRYPOINT ["vdm-server"]
CMD ["--address=0.0.0.0:50051", "--metrics_address=0.0.0.0:9090"]
