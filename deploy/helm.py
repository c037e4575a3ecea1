"""`helm lint` and `helm template` for deploy/check.sh, through helm-python-sdk (Helm's own Go
SDK, bundled in the wheel: no helm binary to fetch).

Usage: helm.py lint|template CHART [KEY=VALUE ...]   (KEY=VALUE as helm's --set)
  lint: prints every finding, fails on any above INFO. template: prints the rendered
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
    findings = helm.lint(chart, values=values)
    bad = 0
    for f in findings or []:
        print(f"helm lint: {f}", file=sys.stderr)
        bad += str(f.get("severity", "")).upper() not in ("INFO", "")
    print(f"helm lint {chart}: {len(findings or [])} findings, {bad} above INFO")
    return 1 if bad else 0


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
