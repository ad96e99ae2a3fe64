"""A run's data as the report reads it, and the queries over its rows.

A report folder holds results.json: what the runner (benchmarks/runner.py) recorded, rewritten
after every step (environment, ceilings, run with its steps, suites, rows, tests, compile), plus
what the report derived from it (headline, missing, headline_sources). Rows are
benchmarks/harness.py's; their implementation names are the suites' own: eager | compile |
triton | cuda (fastdit's kernels) | a third-party name, and end to end workloads.IMPLS.
"""

import json
from pathlib import Path

RESULTS = "results.json"
FASTDIT_KERNEL_IMPLS = ("triton", "cuda")
KERNELS = ("modulate_layer_norm", "gated_residual_modulate_layer_norm", "gated_residual", "patchify", "unpatchify")
E2E_LABELS = {
    "eager": "reference eager",
    "compile": "torch.compile(reference)",
    "fastdit": "fastdit",
    "fastdit+compile": "torch.compile(fastdit)",
}
FASTDIT_E2E = ("fastdit", "fastdit+compile")
RECORDED = ("environment", "ceilings", "run", "suites", "rows", "tests", "compile")  # what the runner writes


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def load_run(out_dir):
    """{'environment', 'ceilings', 'run', 'suites': {name: {..., 'rows'}}, 'tests', 'compile'} of a
    report folder's results.json (empty parts where the run has not reached them)."""
    data = read_json(Path(out_dir) / RESULTS) or {}
    suites = {name: {**s, "rows": []} for name, s in data.get("suites", {}).items()}
    for row in data.get("rows", []):
        suites.setdefault(row["suite"], {"rows": []})["rows"].append(row)
    run = dict(data.get("run") or {})
    run.setdefault("mode", "smoke" if any(r.get("smoke") for r in data.get("rows", [])) else "full")
    return {
        "environment": data.get("environment") or {},
        "ceilings": data.get("ceilings") or {},
        "run": run,
        "suites": suites,
        "tests": data.get("tests") or {},
        "compile": data.get("compile") or {},
    }


def rows_of(run, suite=None, **match):
    """Rows of `suite` (all rows if None) whose fields equal `match`."""
    return [
        r for s in run["suites"].values() for r in s["rows"]
        if suite in (None, r.get("suite")) and all(r.get(k) == v for k, v in match.items())
    ]  # fmt: skip


def measured(row):
    return row is not None and isinstance(row.get("ms"), (int, float)) and row["ms"] > 0


def ratio(num, den):
    return num / den if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den else None


def suite_absent(run, suite):
    """Why `suite` has no rows (None if it has some)."""
    s = run["suites"].get(suite)
    if s is None:
        return f"suite {suite} did not run (not selected, or its step did not start)"
    if not s["rows"]:
        return f"suite {suite} recorded no rows ({s.get('status', 'unknown status')})"
    return None


def why_missing(row, what):
    if row is None:
        return f"{what} not recorded"
    return f"{what}: {row.get('status') or 'no time recorded'}"


def model_label(row):
    """The model a row measured: its name, or, for smoke mode's stand-ins, that it is a stand-in."""
    name = f"{row.get('model')} {row.get('resolution')}²"
    return (
        f"{name} stand-in ({row.get('config', '').removeprefix('smoke stand-in: ')})" if row.get("stand_in") else name
    )


# --------------------------------------------------------------------------------------------
# Rows of one case side by side


def kernel_groups(run, suite):
    """[{case, mode, dtype, D, tokens, impls: {impl: row}}] of a kernel suite, in recorded order."""
    return _groups(rows_of(run, suite), ("case", "mode", "dtype"), ("D", "tokens"))


def attention_groups(run):
    timed = [r for r in rows_of(run, "attention") if "ms" in r]  # not the summary rows
    return _groups(timed, ("case", "T", "Dh", "mode", "dtype"), ("H", "B"))


def _groups(rows, key_fields, extra_fields):
    groups = {}
    for r in rows:
        key = tuple(r.get(k) for k in key_fields)
        g = groups.setdefault(key, {**{k: r.get(k) for k in key_fields + extra_fields}, "impls": {}})
        if measured(r):  # a measured row's shape fields win (a row not run may lack B)
            g.update({k: r.get(k) for k in extra_fields if r.get(k) is not None})
        old = g["impls"].get(r["impl"])
        if old is None or (measured(r) and (not measured(old) or r["ms"] < old["ms"])):
            g["impls"][r["impl"]] = r
    return list(groups.values())


def best_fastdit(impls, kinds=FASTDIT_KERNEL_IMPLS):
    """The fastest measured row among fastdit's implementations (None if none ran)."""
    rows = [impls[k] for k in kinds if measured(impls.get(k))]
    return min(rows, key=lambda r: r["ms"]) if rows else None


def impls_of(groups):
    """Every implementation of the groups, in order of first appearance."""
    return list(dict.fromkeys(k for g in groups for k in g["impls"]))


def e2e_rows(run, task, model, resolution, **match):
    """{impl: row} of the end-to-end suite for one task, model and resolution."""
    return {r["impl"]: r for r in rows_of(run, "end_to_end", task=task, model=model, resolution=resolution, **match)}


def best_e2e(rows):
    """The faster of fastdit eager and torch.compile(fastdit) (None if neither ran)."""
    cands = [rows[k] for k in FASTDIT_E2E if measured(rows.get(k))]
    return max(cands, key=lambda r: r["img_per_s"]) if cands else None


def skipped_work(run):
    """{reason: [what]} of everything that did not run: steps, cases recorded as not run (other
    than alternatives not installed), suite cases never reached, tests not run."""
    out = {}
    for step in run["run"].get("steps", []):
        if step.get("status", "").startswith("skipped"):
            out.setdefault(step["status"], []).append(f"step {step['name']}")
    for r in rows_of(run):
        if not measured(r) and str(r.get("status", "")).startswith("skipped"):
            what = " ".join(str(r[k]) for k in ("suite", "case", "sampler", "mode", "impl") if r.get(k) is not None)
            out.setdefault(r["status"], []).append(what)
    for s in run["suites"].values():
        for case in s.get("not_reached", []):
            out.setdefault(f"not reached: {s.get('status', 'its step stopped')}", []).append(case)
    for t in run["tests"].get("results", []):
        if t["outcome"] == "skipped" and "time budget" in (t.get("message") or ""):
            out.setdefault(t["message"], []).append(f"test {t['test']}")
    for t in run["tests"].get("not_reached", []):
        out.setdefault(f"not reached: {run['tests'].get('status', 'the test step stopped')}", []).append(f"test {t}")
    return out
