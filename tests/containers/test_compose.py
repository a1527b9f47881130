"""The Compose file's observability profile: with it, Grafana is part of the cluster, and
what it mounts provisions the Prometheus data source and kiln's dashboards. Grafana itself
is not run (no registry has its image here); the dashboards' queries are checked against a
live Prometheus by tests/api/test_dashboards.py."""
import json
import subprocess
from pathlib import Path

import yaml

from conftest import ROOT, compose_command


def services(*profile):
    cmd = compose_command() + ["-f", str(ROOT / "deploy/compose.yaml"), "-p", "kilnconfig", *profile, "config"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return yaml.safe_load(out)["services"]


def test_grafana_comes_with_the_observability_profile_and_provisions_the_dashboards():
    with_profile = services("--profile", "observability")
    grafana = with_profile["grafana"]
    mounts = {}
    for v in grafana["volumes"]:
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        mounts[target] = Path(source)
    provisioning, dashboards = mounts["/etc/grafana/provisioning"], mounts["/var/lib/grafana/dashboards"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    assert "prometheus" in with_profile
    [provider] = yaml.safe_load((provisioning / "dashboards" / "kiln.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    boards = sorted(p.name for p in dashboards.glob("*.json"))
    assert boards == ["kiln-failover.json", "kiln-overview.json", "kiln-router.json", "kiln-worker.json"], boards
    for b in boards:
        assert json.loads((dashboards / b).read_text())["templating"]["list"][0]["query"] == "prometheus"
    print(f"\nobservability profile: Grafana provisioned with the Prometheus data source and {len(boards)} dashboards")
