#!/usr/bin/env bash
# Check the oldest supported stack in a fresh virtual environment.
#
#   scripts/check_oldest_stack.sh full [VENV]   oldest torch/torchvision (+ oldest torchattacks),
#                                               then pip install ".[all,test]": torch and
#                                               torchvision must stay as they are; full test suite
#   scripts/check_oldest_stack.sh core [VENV]   CPU-only torch (TORCH_CORE, from the local wheel
#                                               folder if there is one), pip install . and
#                                               pytest: the core tests only
#
# The versions are pyproject.toml's lower bounds; override with TORCH=, TORCHVISION=,
# TORCHATTACKS=, TORCH_CORE=.  Prints versions, the pytest summary, minutes and the venv size.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
VENV=${2:-/tmp/rb_labelrefine_oldest_$MODE}
TORCH=${TORCH:-2.8.0}
TORCHVISION=${TORCHVISION:-0.23.0}
TORCHATTACKS=${TORCHATTACKS:-3.5.0}
TORCH_CORE=${TORCH_CORE:-2.13.0}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)

rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
ver() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo none; }

case "$MODE" in
  full)
    "${pip[@]}" "torch==$TORCH" "torchvision==$TORCHVISION"
    # torchattacks without its requests~=2.25.1 pin (it never imports requests), and *before*
    # robustbench: its wheels carry an old copy of robustbench/ that would overwrite RobustBench's
    # files if installed after it (the README's workaround)
    "${pip[@]}" --no-deps "torchattacks==$TORCHATTACKS"
    before="torch $(ver torch) torchvision $(ver torchvision) requests $(ver requests)"
    "${pip[@]}" ".[all,test]"
    after="torch $(ver torch) torchvision $(ver torchvision) requests $(ver requests)"
    tests=(.)
    ;;
  core)
    "${pip[@]}" "torch==$TORCH_CORE"
    before="torch $(ver torch)"
    "${pip[@]}" .
    "${pip[@]}" "pytest>=7"
    after="torch $(ver torch)"
    # the whole suite: tests that need an extra skip and name it
    tests=(.)
    ;;
  *) echo "usage: $0 full|core [VENV]" >&2; exit 2 ;;
esac
installed=$(( $(date +%s) - start ))
echo "before install: $before"
echo "after install:  $after"
for pkg in torch torchvision; do
  b=$(sed -n "s/.*$pkg \([^ ]*\).*/\1/p" <<<"$before"); a=$(sed -n "s/.*$pkg \([^ ]*\).*/\1/p" <<<"$after")
  if [ -n "$b" ] && [ "$b" != "$a" ]; then echo "FAIL: the install replaced $pkg $b with $a" >&2; exit 1; fi
done
"$VENV/bin/python" -m pip list --format=freeze | grep -iE '^(torch|torchvision|timm|torchattacks|robustbench|pyautoattack|requests|urllib3|numpy|scipy|scikit-learn|matplotlib)==' || true
# The tests run against the installed package, from a copy of the tree (the install-hook tests
# build it) with tests/ as the working directory: neither pytest nor the tests' `python -m`
# subprocesses then have the source on sys.path.
work=$(mktemp -d)
tar --exclude=./build --exclude='./*.egg-info' --exclude=./.git -cf - . | tar -xf - -C "$work"
set +e
(cd "$work/tests" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$work/pytest.log" 2>&1)
rc=$?
set -e
grep -E "^(FAILED|ERROR)" "$work/pytest.log" | head -40 || true
tail -1 "$work/pytest.log"
(cd "$work/tests" && "$VENV/bin/python" -c "import rb_labelrefine; print('tested rb_labelrefine', rb_labelrefine.__version__, 'from', rb_labelrefine.__file__)")
cp "$work/pytest.log" "${VENV%/}.pytest.log"
rm -rf "$work"
total=$(( $(date +%s) - start ))
echo "install ${installed}s, total $(awk "BEGIN{printf \"%.1f\", $total/60}") min, venv $(du -sh "$VENV" | cut -f1)"
exit $rc
