"""Rendering helm/kiln with the real helm binary (scripts/helm.sh), shared by the chart tests
(tests/helm) and the container run of the rendered pods (tests/containers/test_helm.py)."""
import base64
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm/kiln"
VALUES = ROOT / "tests/helm/values"
RELEASE = "kiln"
# The value sets rendered by the tests: the defaults, and one file per deployment shape.
VALUE_SETS = ["default"] + sorted(p.stem for p in VALUES.glob("*.yaml"))


def helm():
    out = subprocess.run([str(ROOT / "scripts/helm.sh")], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/helm.sh failed: {out.stderr.strip()}")
    return str(ROOT / out.stdout.strip())


def values_args(value_set, extra=()):
    args = [] if value_set == "default" else ["-f", str(VALUES / f"{value_set}.yaml")]
    for e in extra:
        args += ["--set", e]
    return args


def render(value_set, extra=(), check=True):
    """The manifests helm renders for `value_set`, as (documents, completed process)."""
    out = subprocess.run([helm(), "template", RELEASE, str(CHART), *values_args(value_set, extra)],
                         capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"helm template ({value_set}) failed: {out.stderr}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d] if out.returncode == 0 else []
    return docs, out


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def find(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def matches(selector, labels):
    """Whether a label selector's matchLabels select `labels`."""
    return all(labels.get(k) == v for k, v in selector.items())


def pod_templates(docs):
    """(workload, pod spec, pod labels) of every Deployment and StatefulSet."""
    return [(d, d["spec"]["template"]["spec"], d["spec"]["template"]["metadata"]["labels"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def container_env(docs, container, extra_fields):
    """The environment Kubernetes would give `container`: envFrom ConfigMaps and Secrets
    first, then env entries in order, with $(VAR) references expanded as the kubelet does and
    downward-API fields taken from `extra_fields` (field path -> value)."""
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(find(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
        elif "secretRef" in src:
            secret = find(docs, "Secret", src["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = extra_fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(find(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
        else:
            raise AssertionError(f"env entry the tests cannot resolve: {e}")
    return env


def expand(text, env):
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            end = text.index(")", i)
            name = text[i + 2:end]
            out.append(env.get(name, text[i:end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
