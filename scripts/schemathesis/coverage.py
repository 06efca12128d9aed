"""Checks that a schemathesis run sent enough requests to every operation.

Reads the ndjson report of `st run --report ndjson` and counts the requests per operation.
Operations whose inputs leave room for variety (a path parameter or a request body) must have
had at least MIN requests; the others (no body, only optional query or header flags) cannot
produce that many distinct requests, so their counts are only printed.

usage: python coverage.py <report.ndjson> <spec.yaml> [MIN]
"""

import collections
import json
import sys

import yaml


def main(report, spec_path, minimum):
    with open(spec_path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    varied = set()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            params = op.get("parameters", []) + item.get("parameters", [])
            if "requestBody" in op or any(p.get("in") == "path" for p in params):
                varied.add(f"{method.upper()} {path}")
    counts = collections.Counter()
    with open(report, encoding="utf-8") as f:
        for line in f:
            event = json.loads(line).get("ScenarioFinished")
            if event and event.get("recorder"):
                counts[event["recorder"]["label"]] += len(event["recorder"].get("interactions", {}))
    short = []
    for label in sorted(varied | set(counts)):
        n = counts.get(label, 0)
        mark = ""
        if label in varied and n < minimum:
            mark = f"   <-- fewer than {minimum}"
            short.append(label)
        print(f"{n:6}  {label}{mark}")
    if short:
        sys.exit(f"{len(short)} operation(s) got fewer than {minimum} requests")
    print(f"every operation with a body or path parameter got at least {minimum} requests")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 30)
