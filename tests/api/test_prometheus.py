"""The Prometheus side: the alert rules load and pass their unit tests (promtool), the
Compose scrape configuration is valid, and each daemon's live /metrics passes
`promtool check metrics` (names, types, help texts, label syntax) after serving a request."""
import re
import subprocess
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"


def promtool(*args, stdin=None):
    out = subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_alert_rules_load_and_pass_their_unit_tests():
    rc, out = promtool("check", "rules", str(RULES / "rules.yml"))
    assert rc == 0, out
    alerts = re.findall(r"- alert: (\w+)", (RULES / "rules.yml").read_text())
    assert len(alerts) == 8 and f"SUCCESS: {len(alerts)} rules found" in out, out
    # Every alert has a unit test.
    assert set(alerts) == set(re.findall(r"alertname: (\w+)", (RULES / "rules.test.yml").read_text()))
    rc, out = promtool("test", "rules", str(RULES / "rules.test.yml"))
    assert rc == 0, out


def test_the_compose_scrape_configuration_is_valid():
    rc, out = promtool("check", "config", str(RULES / "prometheus.yml"))
    assert rc == 0, out


def test_live_metrics_pass_promtool(router, worker, oai, model):
    oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    for name, url in (("router", f"{router.url}/metrics"), ("worker", f"{worker.metrics_url}/metrics")):
        text = httpx.get(url).text
        assert "# TYPE" in text, text[:200]
        rc, out = promtool("check", "metrics", stdin=text)
        # promtool's lint also flags style (e.g. counters without _total); any finding fails.
        assert rc == 0 and not out.strip(), f"{name}: {out}"
