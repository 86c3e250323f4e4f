#!/usr/bin/env python3
"""Print every PromQL expression of a Grafana dashboard, ready to run.

Usage: queries.py [--annotations] [DASHBOARD_JSON]   (default: tradeid.json
next to this script)

One JSON object per line, for each target of each panel (rows included,
collapsed or not, in dashboard order):

    {"row": "Traffic", "panel": "Drops ...", "refId": "A",
     "cluster": false, "expr": "sum by (reason) (rate(...[1m]))"}

- `row` is the title of the row the panel sits under ("" before any row);
- `cluster` is true for panels under a row whose title mentions "cluster":
  their series exist only in etcd cluster mode, so a test against a static
  server should accept an empty result for them, and only for them;
- `expr` has Grafana's variables replaced by plain PromQL: $__rate_interval
  and $__interval by 1m, $__range by 5m ($__range_s 300, $__range_ms
  300000), $instance by .*, ${DS_PROMETHEUS}-style datasource variables are
  not part of expressions. An unknown variable is an error (exit 1), so a new
  variable cannot slip into the dashboard without a substitution here.

With --annotations, annotation queries are printed too (row "",
panel "annotation: NAME"); they legitimately return nothing most of the
time (e.g. restarts), so they are off by default.

Standard library only.
"""

import json
import re
import signal
import sys
from pathlib import Path

SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
    "instance": ".*",
}

# $name, ${name} and ${name:format}. Longest names first is implicit: \w+
# is greedy, so $__range_s is never read as $__range followed by "_s".
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


class UnknownVariable(Exception):
    pass


def substitute(expr):
    def replace(match):
        name = match.group(1) or match.group(2)
        if name not in SUBSTITUTIONS:
            raise UnknownVariable(name)
        return SUBSTITUTIONS[name]

    return VARIABLE.sub(replace, expr)


def panel_targets(panel, row_title):
    """Yields (row, panel title, target) for a panel and any nested panels."""
    for target in panel.get("targets") or []:
        if target.get("expr"):
            yield row_title, panel.get("title", ""), target
    # Collapsed rows keep their panels inside the row.
    for child in panel.get("panels") or []:
        yield from panel_targets(child, panel.get("title", "") if panel.get("type") == "row" else row_title)


def dashboard_targets(dashboard):
    row_title = ""
    for panel in dashboard.get("panels") or []:
        if panel.get("type") == "row":
            # Panels of an expanded row follow it at the top level.
            row_title = panel.get("title", "")
        yield from panel_targets(panel, row_title)


def annotation_targets(dashboard):
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        expr = annotation.get("expr") or (annotation.get("target") or {}).get("expr")
        if expr:
            yield "", "annotation: " + annotation.get("name", ""), {"refId": "Anno", "expr": expr}


def main(argv):
    # Quietly stop when the reader does (`queries.py | head`).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = [a for a in argv[1:] if a != "--annotations"]
    with_annotations = len(args) != len(argv) - 1
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print("usage: queries.py [--annotations] [DASHBOARD_JSON]", file=sys.stderr)
        return 2
    path = Path(args[0]) if args else Path(__file__).with_name("tradeid.json")
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)

    found = list(dashboard_targets(dashboard))
    if with_annotations:
        found += list(annotation_targets(dashboard))
    status = 0
    for row, panel, target in found:
        try:
            expr = substitute(target["expr"])
        except UnknownVariable as e:
            print(f"{path}: panel {panel!r}: unknown Grafana variable ${e} in {target['expr']!r}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({
            "row": row,
            "panel": panel,
            "refId": target.get("refId", ""),
            "cluster": "cluster" in row.lower(),
            "expr": " ".join(expr.split()),
        }))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
