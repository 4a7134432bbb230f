#!/usr/bin/env bash
# Installs what is missing, fetches the default model and builds. Idempotent.
source "$(dirname "$0")/common.sh"
install_packages
fetch_model
ensure_cuda_toolkit if-gpu
build
