"""`helm lint` and `helm template` for deploy/check.sh, through helm-python-sdk (Helm's own Go
SDK, bundled in the wheel: no helm binary to fetch).

Usage: helm.py lint|template CHART [KEY=VALUE ...]   (KEY=VALUE as helm's --set)
  lint: prints every finding, fails on any above INFO (as helm lint --strict). template: prints the rendered
  manifests (NOTES.txt left out) as one multi-document YAML stream, release "alignd" in
  namespace "alignd"; a template's `fail` makes it exit non-zero.
"""

from __future__ import annotations

import sys

import helm_python as helm

RELEASE = NAMESPACE = "alignd"


def overrides(pairs: list[str]) -> dict:
    return helm.parse_set_string(",".join(pairs)) if pairs else {}


def lint(chart: str, values: dict) -> int:
    # helm_python.lint returns a report, not findings as errors: {"total_charts_linted",
    # "messages": [{"severity": 0 unknown | 1 info | 2 warning | 3 error, "path", "error"}],
    # "errors": [str]}. strict=True is helm lint --strict (warnings count as errors).
    report = helm.lint(chart, values=values, strict=True, namespace=NAMESPACE)
    messages = report.get("messages") or []
    bad = 0
    for m in messages:
        severity = int(m.get("severity", 0))
        name = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(severity, "UNKNOWN")
        print(f"helm lint: [{name}] {m.get('path', '')}: {m.get('error', '')}", file=sys.stderr)
        bad += severity != 1
    for e in report.get("errors") or []:
        print(f"helm lint: {e}", file=sys.stderr)
        bad += 1
    linted = report.get("total_charts_linted", 0)
    print(f"helm lint {chart}: {linted} chart(s), {len(messages)} messages, {bad} above INFO")
    return 1 if bad or not linted else 0


def template(chart: str, values: dict) -> int:
    with helm.Chart.load(chart) as c:
        manifests = c.render(values, name=RELEASE, namespace=NAMESPACE)
    for path in sorted(manifests):
        text = manifests[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        print(f"---\n# Source: {path}\n{text}")
    return 0


def main() -> int:
    command, chart, *pairs = sys.argv[1:]
    return {"lint": lint, "template": template}[command](chart, overrides(pairs))


if __name__ == "__main__":
    sys.exit(main())
