#!/usr/bin/env bash
# Mutation testing of the loss, TG-IS, slice-selector (Vote-MI) and checkpoint modules (setup.cfg [mutmut]), run
# against their unit tests; prints the kill rate per module.
#   bench/mutation.sh                      all five modules
#   bench/mutation.sh 'medvlm3d.train.losses*'   only the mutants whose names match (mutmut globs)
#   MUTMUT_TESTS='tests/a.py tests/b.py' bench/mutation.sh ...   only these test files (bench/mutmut_run.py)
# Needs the test extras (pip install -e '.[test]', which brings mutmut 3). Results stay in
# mutants/ (git-ignored); `python bench/mutmut_run.py show <mutant>` prints one mutant's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
if [ "${MUTMUT_REPORT_ONLY:-0}" != 1 ]; then
rm -rf mutants  # mutants are made from the current sources
"$PY" bench/mutmut_run.py run --max-children "${MUTMUT_CHILDREN:-2}" "$@" >/dev/null 2>&1 || true
fi
"$PY" bench/mutmut_run.py results --all true | "$PY" -c '
import collections, re, sys
by = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    m = re.match(r"\s*([\w.]+?)\.x\S*__mutmut_\d+: (.+)$", line.strip())
    if m:
        by[m.group(1)][m.group(2).strip()] += 1
if not by:
    sys.exit("no mutant results (see mutants/ and run bench/mutmut_run.py run by hand)")
print("%-34s %7s %5s %6s %8s %5s  kill rate (of those run)" % ("module", "mutants", "run", "killed", "survived", "other"))
for mod, c in sorted(by.items()):
    n = sum(c.values())
    run = n - c["not checked"]
    if run == 0:
        continue
    k = c["killed"] + c["timeout"]
    s = c["survived"]
    print("%-34s %7d %5d %6d %8d %5d  %.1f%%" % (mod, n, run, k, s, run - k - s, 100 * k / run))
'
