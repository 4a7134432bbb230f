#!/usr/bin/env python3
"""Static checks of deploy/k8s/*.yaml and deploy/compose/docker-compose.yml against the Dockerfile.

No cluster is needed: the files are parsed with PyYAML and checked for what a cluster would only reveal at run
time. Every container names one image; a command's program exists in the image (the entry point the Dockerfile
copies, sshd from openssh-server); the model path is the one the Dockerfile copies; STARSERVE_RANKS equals the
ranks the topology gives (MPIJob: (Worker replicas + 1) x slotsPerWorker); each Service selects a pod template
whose labels match and targets ports that pod names; the gRPC probes hit the gRPC port; the launcher/leader have a
termination grace period for the drain.

Usage: python3 deploy/check_manifests.py [REPO_ROOT]; exit status = number of problems.
"""
import re
import sys
from pathlib import Path

import yaml

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def ok(what):
    print(f"ok: {what}")


# What the Dockerfile provides.
dockerfile = (root / "Dockerfile").read_text()
entrypoint = re.search(r'^ENTRYPOINT \["([^"]+)"', dockerfile, re.M).group(1)
copied = set(re.findall(r"^COPY (?:--from=\S+ )?.*? (\S+)$", dockerfile, re.M))
model_dir = next(d for d in copied if "models" in d).rstrip("/")
default_model = re.search(r"STARSERVE_MODEL=(\S+)", dockerfile).group(1)
in_image = {entrypoint, "/opt/starserve/bin/starserve", "/opt/starserve/bin/starctl", "starctl", "starserve",
            "sh", "mpirun"}
if "openssh-server" in dockerfile:
    in_image.add("/usr/sbin/sshd")
if not default_model.startswith(model_dir + "/"):
    problem("Dockerfile", f"STARSERVE_MODEL {default_model} is not under the copied {model_dir}")
sshd = "yes" if "/usr/sbin/sshd" in in_image else "no"
ok(f"Dockerfile: entry point {entrypoint}, model {default_model}, sshd {sshd}")


def pod_templates(doc):
    """(name, pod spec, labels) of every pod template in a manifest."""
    kind = doc["kind"]
    if kind == "MPIJob":
        for role, rs in doc["spec"]["mpiReplicaSpecs"].items():
            t = rs["template"]
            yield role, t["spec"], t["metadata"].get("labels", {}), rs
    elif kind == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            t = lwt[role]
            yield role, t["spec"], t["metadata"].get("labels", {}), lwt


def check_container(where, c):
    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    program = (c.get("command") or [entrypoint])[0]
    if program not in in_image:
        problem(where, f"command {program} is not in the image")
    text = " ".join(c.get("command", []) + c.get("args", []))
    for path in re.findall(r"/opt/starserve/\S+", text) + [env.get("STARSERVE_MODEL", default_model)]:
        path = path.rstrip('"\\;')
        if path.startswith("/opt/starserve/models/") and path != default_model:
            problem(where, f"model path {path} is not the image's {default_model}")
        elif path.startswith("/opt/starserve/bin/") and path not in in_image:
            problem(where, f"{path} is not in the image")
    if program == "mpirun" or re.search(r"\bexec mpirun\b", text):
        problem(where, "runs mpirun directly: SIGTERM then aborts the ranks instead of draining (use the entry point)")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        p = c.get(probe)
        if p and "grpc" in p and p["grpc"]["port"] != ports.get("grpc"):
            problem(where, f"{probe} gRPC port {p['grpc']['port']} is not the grpc port {ports.get('grpc')}")
    return env, ports, text


images = set()
for path in sorted((root / "deploy/k8s").glob("*.yaml")):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    pods = []
    for doc in docs:
        for role, spec, labels, topo in pod_templates(doc):
            for c in spec["containers"]:
                where = f"{path.name} {doc['kind']}/{role}/{c['name']}"
                images.add(c["image"])
                env, ports, text = check_container(where, c)
                pods.append((labels, ports))
                serves = "serve" in text
                if serves and "terminationGracePeriodSeconds" not in spec:
                    problem(where, "no terminationGracePeriodSeconds for the drain")
                if doc["kind"] == "MPIJob" and serves:
                    want = (doc["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] + 1) * doc["spec"]["slotsPerWorker"]
                    if int(env.get("STARSERVE_RANKS", 0)) != want:
                        have = env.get("STARSERVE_RANKS")
                        problem(where, f"STARSERVE_RANKS {have} != (workers + 1) x slots = {want}")
                if doc["kind"] == "LeaderWorkerSet" and serves and "LWS_GROUP_SIZE * SLOTS_PER_POD" not in text:
                    problem(where, "the rank count is not size x SLOTS_PER_POD")
                ok(f"{where}: {c['image']}, command {(c.get('command') or ['(entry point)'])[0]}")
    for doc in docs:
        if doc["kind"] != "Service":
            continue
        sel = doc["spec"]["selector"]
        matching = [ports for labels, ports in pods if all(labels.get(k) == v for k, v in sel.items())]
        where = f"{path.name} Service/{doc['metadata']['name']}"
        if len(matching) != 1:
            problem(where, f"selector {sel} matches {len(matching)} pod templates, not 1")
            continue
        for p in doc["spec"]["ports"]:
            if isinstance(p["targetPort"], str) and p["targetPort"] not in matching[0]:
                problem(where, f"targetPort {p['targetPort']} is not a port of the selected pod")
        ok(f"{where}: selects one pod template, ports {[p['targetPort'] for p in doc['spec']['ports']]}")

compose = yaml.safe_load((root / "deploy/compose/docker-compose.yml").read_text())
for name, svc in compose["services"].items():
    where = f"docker-compose.yml service {name}"
    images.add(svc["image"])
    if svc.get("build", {}).get("dockerfile") != "Dockerfile":
        problem(where, "does not build the repository's Dockerfile")
    if "entrypoint" in svc:
        problem(where, "overrides the entry point (the drain needs it as PID 1)")
    command = svc.get("command") or [None]
    if command[0] not in ("serve", "generate"):
        problem(where, f"command {svc.get('command')} is not serve/generate for the entry point")
    model = svc.get("environment", {}).get("STARSERVE_MODEL", default_model)
    if model != default_model and not svc.get("volumes"):
        problem(where, f"model {model} is neither the image's nor on a volume")
    if svc["healthcheck"]["test"][1] not in in_image:
        problem(where, f"healthcheck runs {svc['healthcheck']['test'][1]}, not in the image")
    ok(f"{where}: builds Dockerfile, entry point kept, command {command[0]}, stop grace {svc.get('stop_grace_period')}")

if len(images) != 1:
    problem("deploy", f"more than one image name: {sorted(images)}")
for p in problems:
    print(f"PROBLEM: {p}")
print(f"check_manifests: {len(problems)} problem(s)")
sys.exit(len(problems))
