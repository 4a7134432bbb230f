#!/usr/bin/env python3
"""Fails when a source file includes a header from a layer above its own (docs/design.md, "Layers").

The layers, lowest first; each folder may include its own headers and those of the folders it
depends on (directly or through them):

  common  <- kernels/ref <- kernels <- backend <- model <- kv <- star <- engine <- server <- app
  comm    on common only; star and everything above it may use it
  kernels/baselines: kernels (benchmarks and tests only)
  client (starctl): the generated protobuf stubs and common only

Also checked, because each has one home:
  - spdlog is included only by src/common/log.h and log.cpp (logging goes through common/log.h);
  - the process environment (getenv, setenv, putenv) is touched only in src/common/config.cpp;
  - mpi.h and nccl.h only in src/comm; grpcpp only in src/server and src/client.
Usage: scripts/check_layers.py [repo root]. Prints each violation as file:line and exits 1 if any.
"""
import pathlib
import re
import sys

# Direct dependencies of each folder; the check uses their transitive closure.
DEPS = {
    "src/common": [],
    "kernels/ref": ["src/common"],
    "kernels": ["kernels/ref", "src/common"],
    "kernels/attention": ["kernels"],
    "kernels/baselines": ["kernels/attention"],
    "src/backend": ["kernels/attention"],
    "src/model": ["src/backend"],
    "src/comm": ["src/common"],
    "src/kv": ["src/backend"],
    "src/star": ["src/kv", "src/model", "src/comm"],
    "src/engine": ["src/star"],
    "src/server": ["src/engine", "proto"],
    "src/app": ["src/server"],
    "src/client": ["proto", "src/common"],
    "proto": [],
}
# Sub-folders that belong to their parent's layer.
ALIASES = {"src/backend/cuda": "src/backend"}
# Where an include path starting with these names points (include roots are the repo and src/).
SOURCE_EXT = {".h", ".cpp", ".cu", ".cuh"}


def closure(folder, seen=None):
    seen = set() if seen is None else seen
    for dep in DEPS[folder]:
        if dep not in seen:
            seen.add(dep)
            closure(dep, seen)
    return seen


def layer_of(rel):
    """The layer folder of a repo-relative path (its longest known prefix), or None."""
    parts = pathlib.PurePosixPath(rel).parts
    for n in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:n])
        folder = ALIASES.get(folder, folder)
        if folder in DEPS:
            return folder
    return None


def target_of(include, root):
    """The layer of an #include "..." path, or None for a path outside the layered folders."""
    if include.startswith("starserve/v1/"):
        return "proto"
    for base in ("", "src/"):
        if (root / base / include).exists():
            return layer_of(base + include)
    return None


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
    include_re = re.compile(r'^\s*#\s*include\s*[<"]([^">]+)[">]')
    env_re = re.compile(r"\b(getenv|setenv|putenv|unsetenv)\s*\(")
    problems = []
    checked = 0
    for path in sorted(list((root / "src").rglob("*")) + list((root / "kernels").rglob("*"))):
        if path.suffix not in SOURCE_EXT or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        mine = layer_of(rel)
        if mine is None:
            continue
        checked += 1
        allowed = closure(mine) | {mine}
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            m = include_re.match(line)
            if m:
                inc = m.group(1)
                if inc.startswith("spdlog/") and rel not in ("src/common/log.h", "src/common/log.cpp"):
                    problems.append(f"{rel}:{n}: includes <{inc}>: log through common/log.h")
                if inc in ("mpi.h", "nccl.h") and mine != "src/comm":
                    problems.append(f"{rel}:{n}: includes <{inc}>: only src/comm talks to MPI and NCCL")
                if inc.startswith("grpcpp/") and mine not in ("src/server", "src/client"):
                    problems.append(f"{rel}:{n}: includes <{inc}>: only src/server and src/client use gRPC")
                target = target_of(inc, root) if '"' in line else None
                if target is not None and target not in allowed:
                    problems.append(f"{rel}:{n}: includes \"{inc}\" ({target}), above {mine}")
            code = line.split("//", 1)[0]
            if env_re.search(code) and rel != "src/common/config.cpp":
                problems.append(f"{rel}:{n}: touches the environment: only src/common/config.cpp does")
    for p in problems:
        print(p)
    print(f"check_layers: {checked} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
