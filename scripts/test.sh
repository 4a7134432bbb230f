#!/usr/bin/env bash
# Set-up (packages, both default models, build), then every test. Usage: scripts/test.sh [ctest args...]
source "$(dirname "$0")/common.sh"
install_packages
fetch_models
ensure_cuda_toolkit always
build
log "checking the layers (scripts/check_layers.py)"
python3 "$REPO_ROOT/scripts/check_layers.py" "$REPO_ROOT"
log "running tests"
cd "$BUILD_DIR"
# Several tests start mpirun with more ranks than cores; tell Open MPI that is intended.
export OMPI_MCA_rmaps_base_oversubscribe=1
ctest --output-on-failure --timeout 900 "$@"
