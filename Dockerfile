# lorcserve container image (deploy/README.md: "Building the image").
#   docker build -t lorcserve:dev .
#   docker build --build-arg CUDA_ARCHITECTURES=80 -t lorcserve:dev .   # A100
# Stage "build": Debian 12 with NVIDIA's CUDA toolkit packages (nvcc, cudart, cuBLAS, NCCL) in
# /usr/local/cuda, where scripts/build.sh and CMakeLists.txt look for nvcc; then the same scripts
# as CI (scripts/install-deps.sh, scripts/build.sh). Stage "runtime": Debian 12 slim with only the
# Debian and CUDA runtime packages the binary links (computed from ldd in the build stage), the
# binary, the fixture model (for the cpu-demo overlay) and the HTTP gateway (Debian's Python
# packages, stubs generated here); runs as an unprivileged user.

ARG DEBIAN_IMAGE=debian:12
ARG DEBIAN_SLIM_IMAGE=debian:12-slim

FROM ${DEBIAN_IMAGE} AS build
# CUDA 13.0 (what the project is built and measured with); the apt package suffix is 13-0.
ARG CUDA_VERSION=13.0
ARG CUDA_ARCHITECTURES=90
ENV DEBIAN_FRONTEND=noninteractive
COPY deploy/docker/cuda-apt-repo.sh /tmp/cuda-apt-repo.sh
RUN bash /tmp/cuda-apt-repo.sh \
 && v=$(echo "${CUDA_VERSION}" | tr . -) \
 && apt-get install -y -q --no-install-recommends \
      "cuda-nvcc-$v" "cuda-cudart-dev-$v" "libcublas-dev-$v" libnccl-dev \
 && ln -sfn "/usr/local/cuda-${CUDA_VERSION}" /usr/local/cuda \
 && /usr/local/cuda/bin/nvcc --version \
 && rm -rf /var/lib/apt/lists/* /tmp/cuda-apt-repo.sh
WORKDIR /src
# The Debian packages first (a layer that survives source changes); build deps only, no test tools.
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN LORC_DEPS=build bash scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN LORC_CUDA=ON LORC_CMAKE_ARGS="-DLORC_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
      bash scripts/build.sh lorcserve fixture_model \
 && mkdir -p /out/bin /out/lib /out/models/tiny-llama-a \
 && cp build/bin/lorcserve /out/bin/ \
 && bash deploy/docker/runtime-deps.sh /out/bin/lorcserve /out/lib \
      "/usr/local/cuda/targets/x86_64-linux/lib/libcublasLt.so.${CUDA_VERSION%%.*}" > /out/runtime-packages.txt \
 && cat /out/runtime-packages.txt \
 && mkdir -p /out/gateway/stubs \
 && cp -r gateway/lorcserve_gateway /out/gateway/ \
 && protoc --proto_path=proto --python_out=/out/gateway/stubs --grpc_out=/out/gateway/stubs \
      --plugin=protoc-gen-grpc="$(command -v grpc_python_plugin)" proto/lorcserve/v1/lorcserve.proto \
 && cd models/tiny-llama-a \
 && cp config.json generation_config.json tokenizer.json tokenizer_config.json model.safetensors \
      README.md /out/models/tiny-llama-a/

FROM ${DEBIAN_SLIM_IMAGE} AS runtime
ARG CUDA_VERSION=13.0
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
COPY deploy/docker/cuda-apt-repo.sh /tmp/cuda-apt-repo.sh
# The CUDA runtime packages (cudart, cuBLAS, NCCL) come from NVIDIA's repository, as in the build.
RUN bash /tmp/cuda-apt-repo.sh \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y -q --no-install-recommends \
 && apt-get install -y -q --no-install-recommends \
      python3-fastapi python3-uvicorn python3-jinja2 python3-grpcio python3-protobuf python3-cryptography \
 && apt-get purge -y -q curl && apt-get autoremove -y -q \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt /tmp/cuda-apt-repo.sh \
 && groupadd --gid 10001 lorc && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lorc
COPY --from=build /out/lib/ /usr/local/lib/lorcserve/
COPY --from=build /out/bin/lorcserve /usr/local/bin/lorcserve
COPY --from=build /out/models/ /opt/lorcserve/models/
# The OpenAI-compatible gateway (gateway/README.md), started as `lorcserve-gateway`.
COPY --from=build /out/gateway/ /opt/lorcserve/gateway/
COPY deploy/docker/lorcserve-gateway /usr/local/bin/lorcserve-gateway
# The NVIDIA container runtime mounts the driver (libcuda) for the devices a container is given:
# Kubernetes' device plugin sets NVIDIA_VISIBLE_DEVICES per container that requests nvidia.com/gpu,
# `docker run --gpus N` passes its request. Not set here: an image default of "all" would hand
# every GPU of the node to containers that request none (the gateway, the CPU demo's pods).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/cuda-${CUDA_VERSION}/targets/x86_64-linux/lib:/usr/local/lib/lorcserve
USER 10001:10001
# Public API, internal services (workers, rendezvous), Prometheus metrics, the HTTP gateway.
EXPOSE 50051 50052 9090 8000
ENTRYPOINT ["lorcserve"]
CMD ["info"]
