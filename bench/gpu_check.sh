#!/usr/bin/env bash
# The GPU check, prepared for a machine with CUDA: the GPU tests and the benches with --device cuda, in at most
# GPU_CHECK_BUDGET_S seconds (default 470 s, under 8 minutes), printing ONE JSON object on stdout.
#
#   bash bench/gpu_check.sh                 # from the repository root or anywhere; needs python3 with torch + CUDA
#   GPU_CHECK_OUT=/some/dir bash bench/gpu_check.sh    # also keeps every step's stdout/stderr and the JSON there
#
# Each step runs under its own timeout (never past the remaining budget; a step that no longer fits is
# skipped); a failing or timed-out step is reported in the JSON and the next one still runs. Steps, in order of
# importance: the GPU tests (tests/test_gpu.py, -m gpu), bench/extraction.py (the var-d16 target row with 64
# candidates, the demo attack), its edit measurement (20 random draws), bench/unitmem.py in fp32 and bf16,
# bench/generation.py (var-d16), bench/demo_memorization.py and bench/intervention.py (small settings).
# The results land in a fresh store ($IARMEM_STORE is set to a temporary folder).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t iarmem-gpu-check-XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export IARMEM_STORE="$(mktemp -d -t iarmem-gpu-store-XXXXXX)"
START=$(date +%s)
: > "$OUT/steps.tsv"

# step NAME LIMIT_S COMMAND...: run with a timeout that fits the budget; record rc, seconds and status
step() {
  local name="$1" limit="$2"
  shift 2
  local now left t0 rc status
  now=$(date +%s)
  left=$((BUDGET - (now - START) - 15))  # keep 15 s for the report
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "-" "0" "skipped: budget spent" >> "$OUT/steps.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  set -e
  status="ok"
  [ "$rc" -ne 0 ] && status="failed"
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="timed out after ${limit} s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$status" >> "$OUT/steps.tsv"
  return 0
}

step gpu_tests 160 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/junit.xml"
step bench_extraction 130 "$PY" bench/extraction.py --device cuda --sections target,demo_attack \
  --target-candidates 64 --target-batch 16 --reps 2
step bench_edit_measurement 80 "$PY" bench/extraction.py --device cuda --sections edit_measurement --random-draws 20
step bench_unitmem_fp32 50 "$PY" bench/unitmem.py --device cuda --reps 2
step bench_unitmem_bf16 40 "$PY" bench/unitmem.py --device cuda --reps 2 --dtype bf16
step bench_generation 60 "$PY" bench/generation.py --devices cuda --models var-d16 --batches 1,16 --reps 2
step bench_demo_memorization 40 "$PY" bench/demo_memorization.py --device cuda --n-unique 200 --n-heldout 200 \
  --samples-per-class 20
step bench_intervention 40 "$PY" bench/intervention.py --device cuda --variants default --top-percents 0,5 \
  --n-samples 200 --random-draws 3

# one JSON: every step's status and its JSON output (or the tail of its output), the test summary, the GPU
"$PY" - "$OUT" "$START" "$ROOT" <<'EOF' | tee "$OUT/gpu_check.json"
import json, os, subprocess, sys, time
import xml.etree.ElementTree as ET

out, start, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def tail(path, n=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def last_json(path):
    """The last line of the output that parses as a JSON object (the benches print one), or the whole output."""
    text = tail(path, 10**7)
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            v = json.loads(line)
            if isinstance(v, dict):
                return v
        except ValueError:
            continue
    return None


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {e}"


report = {"what": "bench/gpu_check.sh", "steps": {}, "out_dir": out}
report["git_commit"] = run(["git", "-C", root, "rev-parse", "HEAD"])
report["gpu"] = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
report["torch"] = run([sys.executable, "-c", "import torch; print(torch.__version__, torch.cuda.is_available())"])
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, rc, secs, status = line.rstrip("\n").split("\t")
        rec = {"status": status, "rc": None if rc == "-" else int(rc), "seconds": int(secs)}
        if rc != "-":
            j = last_json(os.path.join(out, f"{name}.out"))
            if j is not None and name != "gpu_tests":
                rec["json"] = j
            else:
                rec["stdout_tail"] = tail(os.path.join(out, f"{name}.out"))
            if status != "ok":
                rec["stderr_tail"] = tail(os.path.join(out, f"{name}.err"))
        report["steps"][name] = rec
try:
    suite = ET.parse(os.path.join(out, "junit.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for c in suite.iter("testcase"):
        kind = next((k.tag for k in c if k.tag in ("failure", "error", "skipped")), "passed")
        msg = next((k.get("message", "")[:300] for k in c if k.tag in ("failure", "error")), None)
        cases.append({"test": f"{c.get('classname')}::{c.get('name')}", "result": kind, **({"message": msg} if msg else {})})
    report["tests"] = {
        "passed": sum(c["result"] == "passed" for c in cases),
        "failed": sum(c["result"] in ("failure", "error") for c in cases),
        "skipped": sum(c["result"] == "skipped" for c in cases),
        "cases": cases,
    }
except Exception as e:  # noqa: BLE001 - no junit file: the tests did not run or were killed
    report["tests"] = {"error": f"no test report ({type(e).__name__}: {e})"}
report["total_s"] = int(time.time()) - start
print(json.dumps(report))
EOF
