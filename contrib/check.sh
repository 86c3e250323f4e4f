#!/usr/bin/env bash
# Checks the monitoring files: the alerting rules load and pass their unit
# tests, every alert fires and stays silent in at least one test, carries a
# severity, summary, description and a runbook link to an existing section of
# docs/operations.md; the Grafana dashboard is valid JSON with the datasource
# and $instance variables, every query filters on $instance, every rate or
# increase uses $__rate_interval, cluster-only series stay in the cluster
# row, every query parses (promtool), and queries.py extracts them; every
# metric used anywhere is documented in docs/metrics.md.
#
# Needs promtool (Debian: apt-get install prometheus) and python3 (standard
# library only). Run from anywhere: bash contrib/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RULES=contrib/prometheus/alerts.yml
TESTS=contrib/prometheus/alerts_test.yml
DASHBOARD=contrib/grafana/tradeid.json
QUERIES=contrib/grafana/queries.py
RUNBOOKS=docs/operations.md
METRICS=docs/metrics.md

status=0
fail() { echo "FAIL: $*"; status=1; }
ok() { echo "ok: $*"; }

for tool in promtool python3; do
    command -v "$tool" >/dev/null || { echo "FAIL: $tool not found (promtool: apt-get install prometheus)"; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The rules load.
if out=$(promtool check rules "$RULES" 2>&1); then
    ok "promtool check rules: $(echo "$out" | grep -o '[0-9]* rules found' || echo "$out")"
else
    fail "promtool check rules $RULES"; echo "$out"
fi

# 2. The rule unit tests pass.
if out=$(promtool test rules "$TESTS" 2>&1); then
    ok "promtool test rules $TESTS"
else
    fail "promtool test rules $TESTS"; echo "$out"
fi

# 3. queries.py extracts the dashboard's expressions.
if python3 "$QUERIES" "$DASHBOARD" >"$work/queries.jsonl" 2>"$work/queries.err"; then
    count=$(wc -l <"$work/queries.jsonl")
    if [ "$count" -gt 0 ]; then ok "queries.py extracts $count expressions"; else fail "queries.py extracted nothing"; fi
else
    fail "queries.py failed"; cat "$work/queries.err"
fi
python3 "$QUERIES" --annotations "$DASHBOARD" >"$work/all-queries.jsonl" 2>/dev/null || true

# 4. Static checks of rules, tests, dashboard and docs (standard library only:
#    the YAML files are read line by line, in the layout they are written in).
if ! python3 - "$RULES" "$TESTS" "$DASHBOARD" "$RUNBOOKS" "$METRICS" "$work/all-queries.jsonl" "$work/exprs.yml" <<'PY'
import json, re, sys

rules_path, tests_path, dash_path, runbooks_path, metrics_path, queries_path, exprs_out = sys.argv[1:]
problems = []

def problem(msg):
    problems.append(msg)

def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        problem(f"{path}: {e.strerror}")
        return ""

def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")

# --- rules -----------------------------------------------------------------
rules_text = read(rules_path)
alerts = {}
current = None
for line in rules_text.splitlines():
    m = re.match(r"\s*- alert:\s*(\S+)\s*$", line)
    if m:
        current = m.group(1)
        if current in alerts:
            problem(f"{rules_path}: alert {current} defined twice")
        alerts[current] = {}
        continue
    if re.match(r"\s*- (record|alert):", line):
        current = None
    if current:
        m = re.match(r"\s*(severity|summary|description|runbook):\s*(.*)$", line)
        if m:
            alerts[current][m.group(1)] = m.group(2).strip().strip('"').strip("'")
if not alerts:
    problem(f"{rules_path}: no alerts found")

anchors = set()
in_code = False
for line in read(runbooks_path).splitlines():
    if line.startswith("```"):
        in_code = not in_code
    m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*$", line)
    if m:
        if slug(m.group(1)) in anchors:
            problem(f"{runbooks_path}: heading {m.group(1)!r} twice (its second anchor would get a -1 suffix)")
        anchors.add(slug(m.group(1)))
for target in re.findall(r"\]\(#([^)]+)\)", read(runbooks_path)):
    if target not in anchors:
        problem(f"{runbooks_path}: link to #{target}, which is no heading")

for name, fields in sorted(alerts.items()):
    for key in ("severity", "summary", "description", "runbook"):
        if key not in fields:
            problem(f"{rules_path}: alert {name} has no {key}")
    if fields.get("severity") not in (None, "info", "warning", "critical"):
        problem(f"{rules_path}: alert {name} has severity {fields['severity']!r} (info, warning or critical)")
    runbook = fields.get("runbook", "")
    m = re.fullmatch(r"docs/operations\.md#([\w-]+)", runbook)
    if not m:
        problem(f"{rules_path}: alert {name}: runbook {runbook!r} is not docs/operations.md#ANCHOR")
    elif m.group(1) not in anchors:
        problem(f"{rules_path}: alert {name}: {runbook} has no section in {runbooks_path}")

# --- tests: every alert fires once and stays silent once --------------------
fires, silent = set(), set()
lines = read(tests_path).splitlines()
for i, line in enumerate(lines):
    m = re.match(r"\s*alertname:\s*(\S+)\s*$", line)
    if not m:
        continue
    name = m.group(1)
    rest = [l for l in lines[i + 1:i + 4] if l.strip() and not l.strip().startswith("#")]
    if rest and re.match(r"\s*exp_alerts:\s*\[\]\s*$", rest[0]):
        silent.add(name)
    elif len(rest) > 1 and re.match(r"\s*exp_alerts:\s*$", rest[0]) and re.match(r"\s*- exp_labels:", rest[1]):
        fires.add(name)
    else:
        problem(f"{tests_path}:{i + 1}: cannot tell whether the case for {name} expects alerts")
for name in sorted(alerts):
    if name not in fires:
        problem(f"{tests_path}: no test case where {name} fires")
    if name not in silent:
        problem(f"{tests_path}: no test case where {name} stays silent")
for name in sorted((fires | silent) - set(alerts)):
    problem(f"{tests_path}: tests an alert that does not exist: {name}")

# --- dashboard -------------------------------------------------------------
try:
    dash = json.loads(read(dash_path))
except ValueError as e:
    problem(f"{dash_path}: not JSON: {e}")
    dash = {}
variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
ds = variables.get("DS_PROMETHEUS")
if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    problem(f"{dash_path}: no Prometheus datasource variable DS_PROMETHEUS")
inst = variables.get("instance")
if not inst:
    problem(f"{dash_path}: no $instance variable")
else:
    q = inst.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if (q or "").replace(" ", "") != "label_values(tradeid_build_info,instance)":
        problem(f"{dash_path}: $instance must be label_values(tradeid_build_info, instance), not {q!r}")
    if not (inst.get("multi") and inst.get("includeAll")):
        problem(f"{dash_path}: $instance must be multi-value with All")
    if inst.get("allValue") != ".*":
        problem(f"{dash_path}: $instance's All must be .* (else =~ gets a |-joined list of every value)")

def walk(panels, row=""):
    for p in panels:
        title = p.get("title", "")
        yield row, p
        if p.get("panels"):
            yield from walk(p["panels"], title if p.get("type") == "row" else row)

def expanded_rows(panels):
    row = ""
    for p in panels:
        if p.get("type") == "row":
            row = p.get("title", "")
            yield row, p
            for child in p.get("panels") or []:
                yield row, child
        else:
            yield row, p

ids = set()
ds_ref = "${DS_PROMETHEUS}"
for row, p in expanded_rows(dash.get("panels", [])):
    title = p.get("title", "")
    if p.get("id") in ids:
        problem(f"{dash_path}: panel id {p.get('id')} used twice")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    if (p.get("datasource") or {}).get("uid") != ds_ref:
        problem(f"{dash_path}: panel {title!r}: datasource is not {ds_ref}")
    if not p.get("targets"):
        problem(f"{dash_path}: panel {title!r} has no query")
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        where = f"{dash_path}: panel {title!r} ({row}) {t.get('refId')}"
        if (t.get("datasource") or {}).get("uid") != ds_ref:
            problem(f"{where}: target datasource is not {ds_ref}")
        # Every range of rate/irate/increase is $__rate_interval.
        for m in re.finditer(r"\b(rate|irate|increase)\s*\(", expr):
            depth, j = 1, m.end()
            while j < len(expr) and depth:
                depth += {"(": 1, ")": -1}.get(expr[j], 0)
                j += 1
            inner = expr[m.end():j - 1]
            ranges = re.findall(r"\[([^\]]*)\]", inner)
            if not ranges or any(r.strip() != "$__rate_interval" for r in ranges):
                problem(f"{where}: {m.group(1)}() must use [$__rate_interval]: {expr}")
        # Every tradeid_* selector filters on $instance.
        for m in re.finditer(r"\btradeid_\w+", expr):
            after = expr[m.end():]
            sel = re.match(r"\s*\{([^}]*)\}", after)
            if not sel or 'instance=~"$instance"' not in sel.group(1).replace(" ", ""):
                problem(f"{where}: {m.group(0)} does not filter on instance=~\"$instance\"")
        # Cluster-only series only in the cluster row (a static server has none).
        if re.search(r"\btradeid_(etcd_\w+|cluster_info)\b", expr) and "cluster" not in row.lower():
            if not re.search(r"\bunless\s+on\s*\([^)]*\)\s*tradeid_cluster_info", expr):
                problem(f"{where}: cluster-only series outside the cluster row: {expr}")

# --- every query parses: a rule file of recording rules for promtool --------
exprs = [json.loads(l)["expr"] for l in read(queries_path).splitlines() if l.strip()]
with open(exprs_out, "w", encoding="utf-8") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:query:{i}\n        expr: {json.dumps(e)}\n")

# --- every metric used is documented ----------------------------------------
documented = set(re.findall(r"\btradeid_\w+", read(metrics_path)))
used = set(re.findall(r"\btradeid_\w+", rules_text))
for e in exprs:
    used |= set(re.findall(r"\btradeid_\w+", e))
for name in sorted(used):
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    if name not in documented and base not in documented:
        problem(f"{metrics_path}: {name} is used by the rules or dashboard but not documented")

for p in problems:
    print("FAIL:", p)
if not problems:
    print(f"ok: {len(alerts)} alerts, each with a severity, summary, description and runbook section;"
          f" each fires and stays silent in a test")
    print(f"ok: dashboard: {len(exprs)} queries (annotations included), $instance on every selector, $__rate_interval in every rate,"
          f" cluster-only series in the cluster row; every metric documented")
sys.exit(1 if problems else 0)
PY
then
    status=1
fi

# 5. Every dashboard query parses.
if [ -s "$work/exprs.yml" ]; then
    if out=$(promtool check rules "$work/exprs.yml" 2>&1); then
        ok "promtool parses every dashboard query"
    else
        fail "a dashboard query does not parse"; echo "$out"
    fi
fi

exit $status
