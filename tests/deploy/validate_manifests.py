#!/usr/bin/env python3
"""Renders every kustomize overlay under deploy/overlays/ and validates what comes out.

What is checked, for every overlay (`kubectl kustomize deploy/overlays/X`):
  * LeaderWorkerSet objects against the CRD's openAPIV3Schema (deploy/schema/), with the schema
    closed: an object schema that lists `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` rejects other keys, as the API server's pruning would
    silently drop them (a typo in a field name is an error here, not a field quietly ignored).
    `x-kubernetes-int-or-string`, `nullable` and `x-kubernetes-list-type` (set / map keys unique)
    are honoured. The CRD covers the leader and worker pod templates in full.
  * Built-in kinds (Service, PersistentVolumeClaim, ConfigMap, ...) against python3-kubernetes'
    model classes: every key must be a field of the model (`attribute_map`), every value of the
    model's type (`openapi_types`), recursively; required fields through the client's own
    deserializer.
  * Deployment invariants: Service selectors pick LWS leaders of a rendered LWS and target named
    ports the leader declares, and no Service takes the LWS's name (LWS's headless Service);
    every pod of a group mounts a volume at the coordinator's --model path; probe ports are container ports; --listen / --internal-listen /
    --metrics-port agree with the ports; --tensor-parallel-size = group size x --local-workers;
    nvidia.com/gpu = --local-workers on CUDA pods; the termination grace period covers preStop
    + --drain-timeout-s, and worker pods outlive the leader's drain; volumes and claims exist.
  * Every `--flag` of a `lorcserve <subcommand>` command line (containers, init containers, exec
    probes) is listed by `lorcserve <subcommand> --help` of the build, except those in
    PENDING_FLAGS below; every flag of a `lorcserve-gateway` container by the gateway's --help
    (gateway/), whose --coordinator is the leader's gRPC port and --port a container port.
  * The Dockerfile: stages named and referenced in order, the scripts it runs exist, the final
    stage runs as a non-root user, and what it COPYs is not excluded by .dockerignore.
Then a negative self-test mutates rendered objects (field-name typos in the LWS, its pod
template and a Service, wrong types, a broken invariant, an unknown flag) and requires each to be
rejected, so the validator cannot pass everything.

Usage: validate_manifests.py --repo DIR --lorcserve BIN [--kubectl KUBECTL]
Exit status 0 when everything holds; each problem is printed with the overlay, object and field.
"""

import argparse
import copy
import fnmatch
import os
import re
import shlex
import subprocess
import sys

try:
    import jsonschema
    import yaml
    from kubernetes import client as k8s_client
    from kubernetes.client import models as k8s_models
except ImportError as e:
    sys.exit(f"validate_manifests: {e}: install python3-jsonschema, python3-yaml and "
             f"python3-kubernetes (scripts/install-deps.sh) and run Debian's python3")

# Flags of issue #11 (see the flag table of the operations spec) that the manifests use before
# every branch implementing them is merged: (subcommand, flag). The test fails once a listed flag
# appears in `lorcserve <subcommand> --help`, so this list is emptied as the branches land.
# >>> PENDING_FLAGS: the lead empties this after merging the disc, metrics and sec branches. <<<
PENDING_FLAGS = set()  # every flag the manifests use exists now

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# Model fields holding resource quantities: the API takes a number or a string there, although the
# Python client types them `str`.
QUANTITY_FIELDS = {
    ("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
    ("V1EmptyDirVolumeSource", "size_limit"), ("V1PersistentVolumeClaimStatus", "capacity"),
    ("V1ResourceQuotaSpec", "hard"), ("V1LimitRangeItem", "max"), ("V1LimitRangeItem", "min"),
    ("V1LimitRangeItem", "default"), ("V1LimitRangeItem", "default_request"),
}


class Problems:
    """Collects problems, each prefixed with where it was found."""

    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(f"{where}: {message}")


# ----------------------------------------------------------------------------------------------
# LeaderWorkerSet: JSON schema from the CRD


def close_schema(schema):
    """Returns a copy of a CRD structural schema that jsonschema can enforce as the API would.

    Object schemas with `properties` get `additionalProperties: false` unless they preserve
    unknown fields; `nullable: true` admits null; `x-kubernetes-int-or-string` admits an integer
    or a string (the CRD also spells it with anyOf, which is kept).
    """
    if isinstance(schema, list):
        return [close_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_schema(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("type", None)
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items unique, `map` items unique by x-kubernetes-list-map-keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a set list")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(str(item.get(k)) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate entry with {dict(zip(keys, key))} in a list keyed by {keys}")
            seen.add(key)


def lws_validator(crd_path):
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = close_schema(versions["v1"]["schema"]["openAPIV3Schema"])
    # The object's own metadata is typed `object` only in CRDs: the API server applies ObjectMeta.
    schema["properties"]["metadata"] = {"type": "object"}  # checked as V1ObjectMeta instead
    cls = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                       {"x-kubernetes-list-type": _list_type})
    cls.check_schema(schema)
    return cls(schema)


def validate_lws(validator, obj, where, problems):
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(root)"
        problems.add(where, f"{path}: {error.message}")
    walk_model(obj.get("metadata"), "V1ObjectMeta", f"{where} metadata", problems)


# ----------------------------------------------------------------------------------------------
# Built-in kinds: python3-kubernetes models


def model_class_name(api_version, kind):
    version = api_version.split("/")[-1]
    return version[0].upper() + version[1:] + kind


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def walk_model(value, type_name, where, problems, quantity=False):
    """Checks `value` (parsed YAML) against the python3-kubernetes type `type_name`."""
    if value is None:
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            problems.add(where, f"expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            walk_model(item, type_name[5:-1], f"{where}[{i}]", problems, quantity)
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            problems.add(where, f"expected a map, got {type(value).__name__}")
            return
        inner = type_name[5:-1].split(",", 1)[1].strip()
        for k, v in value.items():
            if not isinstance(k, str):
                problems.add(where, f"map key {k!r} is not a string")
            walk_model(v, inner, f"{where}.{k}", problems, quantity)
        return
    if type_name == "str":
        if quantity and (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return
        if not isinstance(value, str):
            problems.add(where, f"expected a string, got {type(value).__name__} {value!r}")
        return
    if type_name == "int":
        if not _is_int(value):
            problems.add(where, f"expected an integer, got {type(value).__name__} {value!r}")
        return
    if type_name == "float":
        if not (_is_int(value) or isinstance(value, float)):
            problems.add(where, f"expected a number, got {type(value).__name__} {value!r}")
        return
    if type_name == "bool":
        if not isinstance(value, bool):
            problems.add(where, f"expected true/false, got {type(value).__name__} {value!r}")
        return
    if type_name in ("object", "datetime", "date"):
        return  # int-or-string and free-form fields
    cls = getattr(k8s_models, type_name, None)
    if cls is None:
        problems.add(where, f"no model class {type_name} in python3-kubernetes")
        return
    if not isinstance(value, dict):
        problems.add(where, f"expected an object ({type_name}), got {type(value).__name__}")
        return
    by_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        attr = by_key.get(key)
        if attr is None:
            problems.add(where, f"unknown field '{key}' for {type_name} "
                                f"(known: {', '.join(sorted(by_key))})")
            continue
        walk_model(item, cls.openapi_types[attr], f"{where}.{key}", problems,
                   (type_name, attr) in QUANTITY_FIELDS)


def validate_builtin(obj, where, problems):
    name = model_class_name(obj.get("apiVersion", ""), obj.get("kind", ""))
    if getattr(k8s_models, name, None) is None:
        problems.add(where, f"unknown kind {obj.get('apiVersion')} {obj.get('kind')}")
        return
    before = len(problems.items)
    walk_model(obj, name, where, problems)
    if len(problems.items) == before:
        try:  # required fields (the models' constructors check them)
            k8s_client.ApiClient()._ApiClient__deserialize(copy.deepcopy(obj), name)
        except (ValueError, TypeError) as e:
            problems.add(where, f"{name}: {e}")


# ----------------------------------------------------------------------------------------------
# Deployment invariants and flags


def parse_flags(argv):
    """Returns {flag: value or None} of a lorcserve command line (`--a=b` or `--a b`)."""
    flags = {}
    i = 0
    while i < len(argv):
        tok = str(argv[i])
        if tok.startswith("--"):
            if "=" in tok:
                name, val = tok.split("=", 1)
            elif i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
                name, val = tok, str(argv[i + 1])
                i += 1
            else:
                name, val = tok, None
            flags[name] = val
        i += 1
    return flags


def lorcserve_commands(pod_spec):
    """Yields (where, argv) for every lorcserve command line in a pod spec."""
    for kind in ("initContainers", "containers"):
        for c in pod_spec.get(kind) or []:
            argv = list(c.get("command") or []) + list(c.get("args") or [])
            if argv and os.path.basename(str(argv[0])) == "lorcserve":
                yield f"{kind}[{c.get('name')}]", argv[1:]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                cmd = ((c.get(probe) or {}).get("exec") or {}).get("command") or []
                if cmd and os.path.basename(str(cmd[0])) == "lorcserve":
                    yield f"{kind}[{c.get('name')}].{probe}", cmd[1:]


GATEWAY = "lorcserve-gateway"


def gateway_containers(pod_spec):
    """(container, argv after the command) of every gateway container of a pod spec."""
    for c in pod_spec.get("containers") or []:
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        if argv and os.path.basename(str(argv[0])) == GATEWAY:
            yield c, argv[1:]


def gateway_help_flags(cache):
    """The flags `python3 -m lorcserve_gateway --help` lists (this repository's gateway/)."""
    if GATEWAY not in cache:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.path.join(repo, "gateway"))
        out = subprocess.run([sys.executable, "-m", "lorcserve_gateway", "--help"], env=env,
                             capture_output=True, text=True, timeout=60)
        flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", out.stdout))
        if "--coordinator" not in flags:
            raise RuntimeError(f"the gateway's --help printed no flag list:\n{out.stdout}"
                               f"{out.stderr}")
        cache[GATEWAY] = flags
    return cache[GATEWAY]


def help_flags(lorcserve, subcommand, cache):
    if subcommand not in cache:
        out = subprocess.run([lorcserve, subcommand, "--help"], capture_output=True, text=True,
                             timeout=60)
        text = out.stdout + out.stderr
        flags = set(re.findall(r"^\s+(--[a-z0-9][a-z0-9-]*)", text, re.M))
        if "--help" not in flags:
            raise RuntimeError(f"`{lorcserve} {subcommand} --help` printed no flag list:\n{text}")
        cache[subcommand] = flags
    return cache[subcommand]


def check_flags(objs, where, lorcserve, cache, problems, used):
    for obj in objs:
        if obj.get("kind") != "LeaderWorkerSet":
            continue
        lwt = obj["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            spec = ((lwt.get(role) or {}).get("spec")) or {}
            for cwhere, argv in lorcserve_commands(spec):
                if not argv or str(argv[0]).startswith("-"):
                    problems.add(f"{where} {role}.{cwhere}", "lorcserve without a subcommand")
                    continue
                sub = str(argv[0])
                known = help_flags(lorcserve, sub, cache)
                for flag in parse_flags(argv[1:]):
                    used.add((sub, flag))
                    if flag not in known and (sub, flag) not in PENDING_FLAGS:
                        problems.add(f"{where} {role}.{cwhere}",
                                     f"`lorcserve {sub}` has no flag {flag}")
            for c, argv in gateway_containers(spec):
                known = gateway_help_flags(cache)
                for flag in parse_flags(argv):
                    if flag not in known:
                        problems.add(f"{where} {role}.containers[{c.get('name')}]",
                                     f"`{GATEWAY}` has no flag {flag}")


def port_of(addr):
    return int(addr.rsplit(":", 1)[1]) if addr and ":" in addr else None


def sleep_seconds(container):
    cmd = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get(
        "command") or []
    if len(cmd) == 2 and cmd[0] == "sleep":
        return int(cmd[1])
    return 0


def check_invariants(objs, where, problems):
    try:
        _check_invariants(objs, where, problems)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        problems.add(where, f"cannot check the deployment invariants: {type(e).__name__}: {e}")


def _check_invariants(objs, where, problems):
    lws_objs = [o for o in objs if o.get("kind") == "LeaderWorkerSet"]
    claims = {o["metadata"]["name"] for o in objs if o.get("kind") == "PersistentVolumeClaim"}
    if not lws_objs:
        problems.add(where, "no LeaderWorkerSet rendered")
    for lws in lws_objs:
        name = lws["metadata"]["name"]
        lwt = lws["spec"]["leaderWorkerTemplate"]
        size = lwt.get("size", 1)
        w = f"{where} LeaderWorkerSet/{name}"
        leader_spec = (lwt.get("leaderTemplate") or lwt["workerTemplate"])["spec"]
        worker_spec = lwt["workerTemplate"]["spec"]
        leader = leader_spec["containers"][0]
        lflags = parse_flags((leader.get("args") or [])[1:])
        ports = {p.get("name"): p["containerPort"] for p in leader.get("ports") or []}
        # Ports: the flags listen where the container ports (and the Services) say.
        for flag, port_name in (("--listen", "grpc"), ("--internal-listen", "internal")):
            if port_of(lflags.get(flag)) != ports.get(port_name):
                problems.add(w, f"leader {flag}={lflags.get(flag)} is not on the container port "
                                f"named {port_name} ({ports.get(port_name)})")
        metrics = lflags.get("--metrics-port")
        if metrics is not None:
            annotations = (lwt.get("leaderTemplate") or {}).get("metadata", {}).get(
                "annotations") or {}
            if int(metrics) != ports.get("metrics"):
                problems.add(w, f"--metrics-port={metrics} is not the container port 'metrics'")
            if annotations.get("prometheus.io/port") not in (None, str(metrics)):
                problems.add(w, f"prometheus.io/port={annotations['prometheus.io/port']} is "
                                f"not --metrics-port={metrics}")
        # The gateway: calls this pod's coordinator on its gRPC port, listens on a container port.
        for c, argv in gateway_containers(leader_spec):
            gflags = parse_flags(argv)
            if port_of(gflags.get("--coordinator")) != ports.get("grpc"):
                problems.add(w, f"gateway --coordinator={gflags.get('--coordinator')} is not the "
                                f"leader's gRPC port ({ports.get('grpc')})")
            gports = [p["containerPort"] for p in c.get("ports") or []]
            if int(gflags.get("--port", 8000)) not in gports:
                problems.add(w, f"gateway --port={gflags.get('--port', 8000)} is no port of its "
                                f"container ({gports})")
            # The gateway's drain cuts its HTTP streams: as long as the coordinator's (both
            # default to 30 s), or the OpenAI API loses what gRPC callers keep.
            gdrain = float(gflags.get("--drain-timeout-s", 30) or 30)
            cdrain = float(lflags.get("--drain-timeout-s", 30) or 30)
            if gdrain != cdrain:
                problems.add(w, f"gateway --drain-timeout-s={gdrain:g} is not the coordinator's "
                                f"--drain-timeout-s={cdrain:g}")
        # Liveness asks the coordinator's `liveness` service (NOT_SERVING once it has given up on
        # its workers, so the kubelet restarts it): a gRPC probe of that service or the client's
        # --health --health-service=liveness; a TCP check would keep a coordinator that gave up.
        live = leader.get("livenessProbe") or {}
        live_cmd = (live.get("exec") or {}).get("command") or []
        if not ((live.get("grpc") or {}).get("service") == "liveness" or
                ("--health" in live_cmd and "--health-service=liveness" in live_cmd)):
            problems.add(w, "leader livenessProbe does not ask the coordinator's liveness service "
                            f"({live})")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc = (leader.get(probe) or {}).get("grpc")
            if grpc and grpc.get("port") not in ports.values():
                problems.add(w, f"leader {probe} gRPC port {grpc.get('port')} is no container port")
        # Group shape: ranks = pods x local workers; GPUs = local workers.
        local = int(lflags.get("--local-workers", 1) or 1)
        tp = lflags.get("--tensor-parallel-size")
        if tp is not None and int(tp) != size * local:
            problems.add(w, f"--tensor-parallel-size={tp} != size {size} x --local-workers={local}")
        worker = worker_spec["containers"][0]
        wflags = parse_flags((worker.get("args") or [])[1:])
        if size > 1 and int(wflags.get("--local-workers", 1) or 1) != local:
            problems.add(w, f"worker pods run --local-workers={wflags.get('--local-workers', 1)}, "
                            f"the leader {local}: every pod must hold the same number of ranks")
        for role, c, fl, count in (("leader", leader, lflags, local),
                                   ("worker", worker, wflags,
                                    int(wflags.get("--local-workers", 1) or 1))):
            res = c.get("resources") or {}
            gpus = (res.get("limits") or {}).get("nvidia.com/gpu")
            if fl.get("--backend") == "cuda" and (role == "leader" or size > 1):
                if gpus is None or int(gpus) != count:
                    problems.add(w, f"{role}: nvidia.com/gpu limit {gpus} != {count} worker "
                                    f"processes (--local-workers)")
            if gpus is not None and (res.get("requests") or {}).get("nvidia.com/gpu",
                                                                     gpus) != gpus:
                problems.add(w, f"{role}: nvidia.com/gpu requests differ from limits")
        # Drain: the grace period covers preStop + drain; workers outlive the leader's drain.
        drain = int(lflags.get("--drain-timeout-s", 30) or 30)
        lgrace = leader_spec.get("terminationGracePeriodSeconds", 30)
        if lgrace <= sleep_seconds(leader) + drain:
            problems.add(w, f"leader terminationGracePeriodSeconds={lgrace} <= preStop "
                            f"{sleep_seconds(leader)} s + --drain-timeout-s={drain}")
        if size > 1:
            wgrace = worker_spec.get("terminationGracePeriodSeconds", 30)
            if sleep_seconds(worker) <= sleep_seconds(leader) + drain:
                problems.add(w, f"worker preStop sleep {sleep_seconds(worker)} s ends before the "
                                f"leader's preStop + drain ({sleep_seconds(leader) + drain} s)")
            if wgrace <= sleep_seconds(worker):
                problems.add(w, f"worker terminationGracePeriodSeconds={wgrace} <= its preStop")
        # The model: the coordinator names a path every rank opens, so every pod of the group
        # mounts a volume there (the workers read the weights from the coordinator's --model).
        model = lflags.get("--model")
        for role, c in (("leader", leader), ("worker", worker)):
            if role == "worker" and size == 1:
                continue
            mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts") or []]
            if model is None or not any(model.startswith(m) for m in mounts):
                problems.add(w, f"{role} container mounts no volume holding --model={model}")
        # Volumes: mounts name volumes of the pod; claims are rendered.
        for role, spec in (("leader", leader_spec), ("worker", worker_spec)):
            volumes = {v["name"]: v for v in spec.get("volumes") or []}
            for c in (spec.get("initContainers") or []) + spec["containers"]:
                for m in c.get("volumeMounts") or []:
                    if m["name"] not in volumes:
                        problems.add(w, f"{role} container {c['name']} mounts unknown volume "
                                        f"{m['name']}")
            for v in volumes.values():
                claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is not None and claim not in claims:
                    problems.add(w, f"{role} volume {v['name']} claims {claim}, not rendered")
    # Services: leaders of a rendered LWS, named target ports the leader declares.
    for svc in (o for o in objs if o.get("kind") == "Service"):
        w = f"{where} Service/{svc['metadata']['name']}"
        if any(svc["metadata"]["name"] == o["metadata"]["name"] for o in lws_objs):
            problems.add(w, "a Service named like the LeaderWorkerSet keeps LWS from creating its "
                            "headless Service (the pods' DNS names, $LWS_LEADER_ADDRESS)")
        selector = svc["spec"].get("selector") or {}
        lws = next((o for o in lws_objs if o["metadata"]["name"] == selector.get(LWS_NAME_LABEL)),
                   None)
        if lws is None:
            problems.add(w, f"selector {LWS_NAME_LABEL}={selector.get(LWS_NAME_LABEL)} names no "
                            "rendered LeaderWorkerSet")
            continue
        if selector.get(LWS_INDEX_LABEL) != "0":
            problems.add(w, f"selector must pick leaders only ({LWS_INDEX_LABEL}: \"0\")")
        lwt = lws["spec"]["leaderWorkerTemplate"]
        template = lwt.get("leaderTemplate") or lwt["workerTemplate"]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update({LWS_NAME_LABEL: lws["metadata"]["name"], LWS_INDEX_LABEL: "0"})
        for k, v in selector.items():
            if labels.get(k) != v:
                problems.add(w, f"selector {k}={v} matches no leader pod label")
        names = {p.get("name") for c in template["spec"]["containers"]
                 for p in c.get("ports") or []}
        for p in svc["spec"].get("ports") or []:
            target = p.get("targetPort")
            if isinstance(target, str) and target not in names:
                problems.add(w, f"targetPort {target} is no named port of a leader container")


# ----------------------------------------------------------------------------------------------
# Dockerfile


def read_dockerfile(repo):
    """Returns (Dockerfile text, .dockerignore patterns), or None when either is missing."""
    path = os.path.join(repo, "Dockerfile")
    ignore_path = os.path.join(repo, ".dockerignore")
    if not os.path.exists(path) or not os.path.exists(ignore_path):
        return None
    with open(ignore_path) as f:
        ignores = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    with open(path) as f:
        return f.read(), ignores


def dockerignored(src, ignores):
    """Whether .dockerignore's patterns exclude `src` (a path or any folder above it)."""
    parts = src.strip("/").split("/")
    excluded = False
    for pat in ignores:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def dockerfile_instructions(text):
    """Yields (line number, instruction, rest) with continuation lines joined."""
    start, buf = None, ""
    for n, line in enumerate(text.splitlines(), 1):
        if start is None:
            if not line.strip() or line.strip().startswith("#"):
                continue
            start = n
        buf += " " + line.rstrip()[:-1] if line.rstrip().endswith("\\") else " " + line.strip()
        if not line.rstrip().endswith("\\"):
            instr, _, rest = buf.strip().partition(" ")
            yield start, instr.upper(), rest.strip()
            start, buf = None, ""


def check_dockerfile(repo, text, ignores, problems):
    stages, user = [], None
    for n, instr, rest in dockerfile_instructions(text):
        w = f"Dockerfile:{n}"
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            if not m:
                problems.add(w, f"malformed FROM: {rest}")
                continue
            stages.append(m.group(2))
            user = None
        elif not stages and instr != "ARG":
            problems.add(w, f"{instr} before the first FROM")
        elif instr == "USER":
            user = rest
        elif instr == "COPY":
            parts = shlex.split(rest)
            opts = [p for p in parts if p.startswith("--")]
            srcs = [p for p in parts if not p.startswith("--")][:-1]
            from_stage = next((o.split("=", 1)[1] for o in opts if o.startswith("--from=")), None)
            if from_stage is not None:
                if from_stage not in stages[:-1]:
                    problems.add(w, f"COPY --from={from_stage}: no earlier stage of that name")
                continue
            for src in srcs:
                if not os.path.exists(os.path.join(repo, src.rstrip("/"))):
                    problems.add(w, f"COPY source {src} does not exist in the repository")
                if src.strip("/") not in ("", ".") and dockerignored(src, ignores):
                    problems.add(w, f"COPY source {src} is excluded by .dockerignore")
        elif instr == "RUN":
            for script in re.findall(r"((?:scripts|deploy)/[A-Za-z0-9_./-]+\.sh)", rest):
                if not os.path.exists(os.path.join(repo, script)):
                    problems.add(w, f"RUN uses {script}, which does not exist")
    if len(stages) < 2:
        problems.add("Dockerfile", "expected a multi-stage build (build and runtime stages)")
    if user in (None, "root", "0") or (user or "").startswith(("root:", "0:")):
        problems.add("Dockerfile", f"the final stage must run as a non-root USER (got {user})")


# ----------------------------------------------------------------------------------------------


def dockerfile_self_test(repo, text, ignores):
    """Each broken variant of the Dockerfile must be rejected; returns those that were not."""
    variants = [
        ("COPY --from a stage that does not exist", text.replace("--from=build", "--from=bulid"),
         ignores),
        ("RUN of a script that does not exist", text.replace("scripts/build.sh",
                                                              "scripts/biuld.sh"), ignores),
        ("final stage without USER", re.sub(r"^USER .*$", "", text, flags=re.M), ignores),
        ("COPY of a path .dockerignore excludes", text, ignores + ["scripts"]),
    ]
    missed = []
    for name, variant, variant_ignores in variants:
        problems = Problems()
        check_dockerfile(repo, variant, variant_ignores, problems)
        if variant == text and variant_ignores == ignores or not problems.items:
            missed.append(name)
        else:
            print(f"  self-test rejects Dockerfile: {name}: {problems.items[0]}")
    return missed


def render(kubectl, overlay):
    out = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"`{kubectl} kustomize {overlay}` failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(objs, where, lws, lorcserve, cache, used=None):
    problems = Problems()
    for obj in objs:
        ow = f"{where} {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        if obj.get("apiVersion") == LWS_API and obj.get("kind") == "LeaderWorkerSet":
            validate_lws(lws, obj, ow, problems)
        else:
            validate_builtin(obj, ow, problems)
    if not problems.items:  # the invariants assume well-formed objects
        check_invariants(objs, where, problems)
        check_flags(objs, where, lorcserve, cache, problems, used if used is not None else set())
    return problems.items


def self_test(objs, lws, lorcserve, cache):
    """Each mutation must be rejected; returns the mutations that were not."""
    def first(kind):
        return next(o for o in objs if o.get("kind") == kind)

    def leader(o):
        return o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]

    def gateway(o):
        return next(c for c in leader(o)["containers"] if c["name"] == "gateway")

    def mutate_rename(get_parent, old, new):
        def f(o):
            parent = get_parent(o)
            parent[new] = parent.pop(old)
        return f

    mutations = [
        ("LWS spec field typo (leaderWorkerTemplate.size -> sise)",
         "LeaderWorkerSet", mutate_rename(lambda o: o["spec"]["leaderWorkerTemplate"], "size",
                                          "sise")),
        ("LWS pod template container field typo (imagePullPolicy -> imagePulPolicy)",
         "LeaderWorkerSet", mutate_rename(lambda o: leader(o)["containers"][0], "imagePullPolicy",
                                          "imagePulPolicy")),
        ("LWS probe field typo (readinessProbe.periodSeconds -> periodSecond)",
         "LeaderWorkerSet", mutate_rename(lambda o: leader(o)["containers"][0]["readinessProbe"],
                                          "periodSeconds", "periodSecond")),
        ("LWS template metadata typo (labels -> label)",
         "LeaderWorkerSet", mutate_rename(
             lambda o: o["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"], "labels",
             "label")),
        ("LWS wrong type (size: \"2\")",
         "LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].__setitem__("size", "2")),
        ("LWS wrong type (containerPort: \"50051\")",
         "LeaderWorkerSet", lambda o: leader(o)["containers"][0]["ports"][0].__setitem__(
             "containerPort", "50051")),
        ("LWS enum (restartPolicy: Sometimes)",
         "LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].__setitem__(
             "restartPolicy", "Sometimes")),
        ("LWS duplicate container port name in a keyed list",
         "LeaderWorkerSet", lambda o: leader(o)["containers"][0]["ports"].append(
             dict(leader(o)["containers"][0]["ports"][0]))),
        ("Service field typo (spec.selector -> selctor)",
         "Service", mutate_rename(lambda o: o["spec"], "selector", "selctor")),
        ("Service wrong type (ports[0].port: \"50051\")",
         "Service", lambda o: o["spec"]["ports"][0].__setitem__("port", "50051")),
        ("Service missing required field (ports[0].port)",
         "Service", lambda o: o["spec"]["ports"][0].pop("port")),
        ("Service metadata typo (labels -> lables)",
         "Service", mutate_rename(lambda o: o["metadata"], "labels", "lables")),
        ("Service named like the LeaderWorkerSet (hides LWS's headless Service)",
         "Service", lambda o: o["metadata"].__setitem__("name", "lorcserve")),
        ("Service selects workers too (no worker-index)",
         "Service", lambda o: o["spec"]["selector"].pop(LWS_INDEX_LABEL)),
        ("invariant: --tensor-parallel-size disagrees with the group",
         "LeaderWorkerSet", lambda o: leader(o)["containers"][0]["args"].append(
             "--tensor-parallel-size=3")),
        ("invariant: grace period shorter than preStop + drain",
         "LeaderWorkerSet", lambda o: leader(o).__setitem__("terminationGracePeriodSeconds", 10)),
        ("invariant: worker pods do not mount the model",
         "LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"][
             "containers"][0].pop("volumeMounts")),
        ("flag unknown to lorcserve (--no-such-flag)",
         "LeaderWorkerSet", lambda o: leader(o)["containers"][0]["args"].append("--no-such-flag")),
        ("flag unknown to the gateway (--no-such-flag)",
         "LeaderWorkerSet", lambda o: gateway(o)["args"].append("--no-such-flag")),
        ("invariant: the gateway calls another port than the coordinator's",
         "LeaderWorkerSet", lambda o: gateway(o)["args"].append("--coordinator=127.0.0.1:50052")),
        ("invariant: the gateway listens on no container port",
         "LeaderWorkerSet", lambda o: gateway(o)["args"].append("--port=8080")),
        ("invariant: the gateway drains shorter than the coordinator",
         "LeaderWorkerSet", lambda o: gateway(o)["args"].append("--drain-timeout-s=7")),
        ("invariant: leader liveness is a TCP check (never restarts a coordinator that gave up)",
         "LeaderWorkerSet", lambda o: leader(o)["containers"][0].__setitem__(
             "livenessProbe", {"tcpSocket": {"port": 50051}, "periodSeconds": 10})),
    ]
    baseline = validate(objs, "self-test baseline", lws, lorcserve, cache)
    if baseline:
        return [f"(nothing: the unmutated objects already fail: {baseline[0]})"]
    missed = []
    for name, kind, mutate in mutations:
        mutated = copy.deepcopy(objs)
        mutate(next(o for o in mutated if o.get("kind") == kind))
        found = validate(mutated, "self-test", lws, lorcserve, cache)
        if not found:
            missed.append(name)
        else:
            print(f"  self-test rejects {name}: {found[0]}")
    first("LeaderWorkerSet")  # the unmutated objects must contain both kinds
    first("Service")
    return missed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--lorcserve", required=True)
    ap.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    args = ap.parse_args()
    repo = os.path.abspath(args.repo)

    try:
        version = subprocess.run([args.kubectl, "version", "--client"], capture_output=True,
                                 text=True).stdout.strip().replace("\n", "; ")
    except FileNotFoundError:
        print(f"FAIL no {args.kubectl}: install kubernetes-client (scripts/install-deps.sh)")
        return 1
    print(f"kubectl: {version}")
    lws = lws_validator(os.path.join(repo, "deploy", "schema",
                                     "leaderworkerset.x-k8s.io_leaderworkersets.yaml"))
    overlays_dir = os.path.join(repo, "deploy", "overlays")
    overlays = sorted(d for d in os.listdir(overlays_dir)
                      if os.path.exists(os.path.join(overlays_dir, d, "kustomization.yaml")))
    failures, cache, used, rendered = [], {}, set(), {}
    for overlay in overlays:
        objs = render(args.kubectl, os.path.join(overlays_dir, overlay))
        rendered[overlay] = objs
        problems = validate(objs, overlay, lws, args.lorcserve, cache, used)
        kinds = ", ".join(sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs))
        print(f"{overlay}: {len(objs)} objects ({kinds}): "
              f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
        failures += problems
    for overlay in ("cpu-demo", "gpu-70b-tp4", "gpu-70b-tp8-2nodes"):
        if overlay not in rendered:
            failures.append(f"overlay {overlay} is missing")

    # A pending flag that the build already lists must leave PENDING_FLAGS.
    for sub, flag in sorted(PENDING_FLAGS):
        if sub in cache and flag in cache[sub]:
            failures.append(f"`lorcserve {sub}` now has {flag}: remove it from PENDING_FLAGS in "
                            f"{os.path.relpath(__file__, repo)}")
        elif (sub, flag) not in used:
            failures.append(f"PENDING_FLAGS lists {sub} {flag}, which no manifest uses")
    pending_used = sorted(f"{s} {f}" for s, f in used if (s, f) in PENDING_FLAGS)
    if pending_used:
        print(f"flags allowed as pending (not in this build's --help yet): {', '.join(pending_used)}")

    dockerfile = Problems()
    docker_files = read_dockerfile(repo)
    if docker_files is None:
        dockerfile.add("Dockerfile", "Dockerfile or .dockerignore missing at the repository root")
    else:
        check_dockerfile(repo, *docker_files, dockerfile)
        failures += [f"self-test: the Dockerfile check accepted: {m}"
                     for m in dockerfile_self_test(repo, *docker_files)]
    failures += dockerfile.items
    print(f"Dockerfile: {'OK' if not dockerfile.items else 'problems'}")

    if "cpu-demo" in rendered:
        missed = self_test(rendered["cpu-demo"], lws, args.lorcserve, cache)
        failures += [f"self-test: the validator accepted: {m}" for m in missed]

    for f in failures:
        print(f"FAIL {f}")
    if failures:
        return 1
    print("all overlays valid; every self-test mutation rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
