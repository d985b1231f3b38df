#!/usr/bin/env bash
# Checks the Helm chart in helm/bloom-runtime without a cluster and without the helm binary:
#
#   1. lints it (helm-python-sdk: Helm's own linter, through libhelm_c),
#   2. checks that values.schema.json describes every value of values.yaml and that the
#      chart's README.md documents every value in its tables,
#   3. renders it with the default values and with every scripts/chart-values/*.yaml,
#   4. validates every rendered manifest against the Kubernetes OpenAPI schemas
#      (kubernetes-validate, strict: unknown fields are errors); CRD kinds that the core
#      schemas do not have (ServiceMonitor) are counted and skipped,
#   5. checks that invalid values are refused (schema and template checks),
#   6. writes one line `<binary>\t<args as JSON>\t<env as JSON>` for every rendered
#      container of a bloom binary to $1 (default /tmp/bloom-chart-containers.txt), secret
#      and field references replaced by placeholders, so that scripts/check-config.sh can
#      run `<binary> <args> --check-config` with exactly that environment. Identical lines
#      are written once.
#
# Usage: scripts/check-chart.sh [OUTPUT_FILE]
# Env:   KUBE_VERSION (default 1.29.0), PYTHON (default python3)
# Installs helm-python-sdk, kubernetes-validate and pyyaml with pip when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-/tmp/bloom-chart-containers.txt}
PYTHON=${PYTHON:-python3}
export KUBE_VERSION=${KUBE_VERSION:-1.29.0}

if ! "$PYTHON" -c 'import helm_python, kubernetes_validate, yaml' >/dev/null 2>&1; then
  echo "[check-chart] installing helm-python-sdk kubernetes-validate pyyaml" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check \
    "helm-python-sdk>=0.2.2,<0.3" "kubernetes-validate>=1.29,<2" pyyaml >&2
fi

"$PYTHON" - "$OUT" <<'PY'
import json
import os
import re
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml
from helm_python import Chart, HelmError

CHART = Path("helm/bloom-runtime")
VALUES_DIR = Path("scripts/chart-values")
OUT = Path(sys.argv[1])
KUBE_VERSION = os.environ["KUBE_VERSION"]
RELEASE, NAMESPACE = "bloom", "bloom"
BINARIES = {"bloom-api", "bloom-reconciler", "bloom-worker", "bloomctl"}
# Kinds outside the core Kubernetes schemas (CRDs): counted, not validated.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Stand-ins for values that come from Secrets, ConfigMaps or the downward API.
PLACEHOLDERS = {
    "DATABASE_URL": "postgres://user:pass@db:5432/bloom",
    "NATS_URL": "nats://user:pass@nats:4222",
}

errors: list[str] = []
stats = {"renders": 0, "validated": 0, "crd_skipped": 0, "containers": 0}


def fail(msg: str) -> None:
    errors.append(msg)
    print(f"  ERROR {msg}")


# --- 1. lint --------------------------------------------------------------------
def lint(values: dict | None, label: str) -> None:
    report = helm_python.lint(CHART, values, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    reported = set()
    for m in report.get("messages", []):
        sev = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "UNKNOWN")
        if sev == "ERROR":
            fail(f"lint [{label}] {m.get('path')}: {m.get('error')}")
            reported.add(m.get("error"))
        elif sev == "WARNING":
            print(f"  lint warning [{label}] {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []):
        if e not in reported:
            fail(f"lint [{label}]: {e}")


# --- 2. schema coverage ---------------------------------------------------------
def schema_covers(values, schema, path="") -> None:
    if not isinstance(values, dict) or schema.get("type") != "object" or "properties" not in schema:
        return
    for key, val in values.items():
        sub = schema["properties"].get(key)
        if sub is None:
            if schema.get("additionalProperties", True) is False:
                fail(f"values.schema.json does not describe {path}{key}")
            continue
        if not sub.get("description") and "oneOf" not in sub:
            fail(f"values.schema.json: {path}{key} has no description")
        schema_covers(val, sub, f"{path}{key}.")


def readme_covers(defaults: dict) -> None:
    """Every value of values.yaml (or an ancestor) has a row in README.md's '## Values'
    tables, and every row there names a value."""
    readme = CHART / "README.md"
    if not readme.exists():
        fail("helm/bloom-runtime/README.md is missing")
        return
    text = readme.read_text()
    if "\n## Values\n" not in text:
        fail("README.md has no '## Values' section")
        return
    values_section = text.split("\n## Values\n", 1)[1]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", values_section, re.M))

    def walk(value, path: str) -> None:
        if path in documented:
            return
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(sub, f"{path}.{key}" if path else key)
        elif path:
            fail(f"README.md does not document the value {path}")

    walk({k: v for k, v in defaults.items() if k != "global"}, "")
    for key in sorted(documented):
        node = defaults
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                fail(f"README.md documents {key}, which values.yaml does not have")
                break
            node = node[part]


# --- 3./4. render and validate ---------------------------------------------------
def env_value(var: dict) -> str:
    name = var["name"]
    if "value" in var:
        return str(var["value"])
    src = var.get("valueFrom", {})
    if "fieldRef" in src:
        field = src["fieldRef"].get("fieldPath", "")
        return "bloom-worker-7d9f8c6b5-x2x4q" if field == "metadata.name" else "placeholder"
    if "secretKeyRef" in src or "configMapKeyRef" in src:
        return PLACEHOLDERS.get(name, "placeholder")
    if "resourceFieldRef" in src:
        return "1"
    return ""


def containers_of(doc: dict) -> list[dict]:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        pod = (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        pod = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    elif kind == "Pod":
        pod = spec
    else:
        return []
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def render(values: dict | None, label: str, lines: list[str]) -> None:
    print(f"[{label}]")
    lint(values, label)
    try:
        with Chart.load(CHART) as chart:
            manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    except HelmError as e:
        fail(f"render [{label}]: {e}")
        return
    stats["renders"] += 1
    kinds: dict[str, int] = {}
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            if not text.strip():
                fail(f"[{label}] NOTES.txt rendered empty")
            continue
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as e:
            fail(f"[{label}] {template}: invalid YAML: {e}")
            continue
        for doc in docs:
            api, kind = doc.get("apiVersion"), doc.get("kind")
            name = (doc.get("metadata") or {}).get("name", "?")
            where = f"[{label}] {template}: {kind}/{name}"
            kinds[kind] = kinds.get(kind, 0) + 1
            if (api, kind) in CRD_KINDS:
                stats["crd_skipped"] += 1
            else:
                try:
                    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                    stats["validated"] += 1
                except kubernetes_validate.ValidationError as e:
                    loc = "/".join(str(p) for p in e.path)
                    fail(f"{where}: {loc}: {e.message}")
                except Exception as e:  # SchemaNotFoundError and friends
                    fail(f"{where}: cannot validate: {getattr(e, 'message', e)}")
            for c in containers_of(doc):
                cmd = (c.get("command") or [""])[0]
                binary = os.path.basename(cmd)
                if binary not in BINARIES:
                    continue
                env = {v["name"]: env_value(v) for v in c.get("env") or []}
                args = [str(a) for a in (c.get("args") or [])]
                lines.append(f"{binary}\t{json.dumps(args)}\t{json.dumps(env, sort_keys=False)}")
                stats["containers"] += 1
    print("  " + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())))


# --- 5. values that must be refused ----------------------------------------------
# label -> (values, text the refusal must contain)
NEGATIVE = {
    "unknown top-level value": ({"replicaCount": 3}, "replicaCount"),
    "unknown nested value": ({"api": {"rateLimit": 5}}, "rateLimit"),
    "worker shutdown grace >= termination grace": (
        {"workers": {"enabled": True, "shutdownGraceSecs": 30, "terminationGracePeriodSeconds": 30}},
        "shutdownGraceSecs",
    ),
    "maxConcurrency out of range": ({"workers": {"enabled": True, "maxConcurrency": 257}}, "/workers/maxConcurrency"),
    "invalid executor": ({"workers": {"executor": "shell"}}, "/workers/executor"),
    "invalid NATS namespace": ({"nats": {"namespace": "bloom.prod"}}, "/nats/namespace"),
    "production without API key": ({"api": {"environment": "production"}}, "api.apiKey"),
    "no database URL": ({"database": {"url": ""}}, "database.url"),
    "body limit below 1024": ({"api": {"bodyLimitBytes": 100}}, "/api/bodyLimitBytes"),
    "invalid log format": ({"logFormat": "xml"}, "/logFormat"),
    "HPA min above max": (
        {"api": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "minReplicas",
    ),
}


def must_fail(values: dict, expect: str, label: str) -> None:
    try:
        with Chart.load(CHART) as chart:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    except HelmError as e:
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        reason = reason.replace("values don't meet the specifications of the schema(s) in the following chart(s): ", "")
        if expect in reason:
            print(f"  refused as expected: {label}: {reason[:200]}")
        else:
            fail(f"values refused for another reason than expected ({expect!r}): {label}: {reason}")
        return
    fail(f"values were accepted but must be refused: {label}: {values}")


def main() -> int:
    print(f"helm-python-sdk {helm_python.__version__} (Helm SDK {helm_python.helm_sdk_version()}), "
          f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {KUBE_VERSION}")
    with Chart.load(CHART) as chart:
        meta, defaults, schema = chart.metadata, chart.values, chart.schema
    print(f"chart {meta['name']} {meta['version']} (app {meta.get('appVersion')})")
    if schema is None:
        fail("values.schema.json is missing")
    else:
        schema_covers(defaults, schema)
    readme_covers(defaults)

    lines: list[str] = []
    render(None, "defaults", lines)
    files = sorted(VALUES_DIR.glob("*.yaml"))
    if not files:
        fail(f"no value files in {VALUES_DIR}")
    for f in files:
        values = yaml.safe_load(f.read_text()) or {}
        render(values, f.name, lines)

    print("[must be refused]")
    for label, (values, expect) in NEGATIVE.items():
        must_fail(values, expect, label)

    seen, unique = set(), []
    for line in lines:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(f"{line}\n" for line in unique))

    print(f"renders: {stats['renders']}, manifests validated: {stats['validated']}, "
          f"CRD manifests skipped: {stats['crd_skipped']}, bloom containers: {stats['containers']} "
          f"({len(unique)} distinct lines written to {OUT})")
    if errors:
        print(f"check-chart: FAILED with {len(errors)} error(s)")
        return 1
    print("check-chart: OK")
    return 0


sys.exit(main())
PY
