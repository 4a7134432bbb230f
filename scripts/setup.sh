#!/usr/bin/env bash
# Installs what is missing, fetches both default models and builds. Idempotent.
source "$(dirname "$0")/common.sh"
install_packages
fetch_models
ensure_cuda_toolkit if-gpu
build
