#!/usr/bin/env bash
# The whole test suite, from a fresh clone: make a venv, install the pinned set, check that the
# notebooks and brats_nb/ agree and are clean, run every notebook (nbdev_test, CPU: `slow` and
# `cuda` cells skipped) and then pytest.   Usage: bash tests/run_all.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BRATS_NB_VENV:-.venv}
PY=${PYTHON:-python3}

step() { printf '\n== %s ==\n' "$*"; }

step "install into $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -m pip check
python -c "import brats_nb, torch, monai, nbdev; print('brats_nb', brats_nb.__version__, '| torch', torch.__version__, '| monai', monai.__version__, '| nbdev', nbdev.__version__)"

if [ -f tests/install_browser.sh ]; then step "browser for the UI test"; bash tests/install_browser.sh; fi

step "notebooks and library agree, notebooks are clean"
snapshot() { find nbs brats_nb -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; }
before=$(snapshot)
nbdev_clean
nbdev_export
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev_clean or nbdev_export changed these files; run them and commit the result:"
  diff <(echo "$before") <(echo "$after") | grep '^>' | awk '{print "   ", $3}'
  exit 1
fi
echo "ok"

# one BLAS/OpenMP thread per process: nbdev_test runs two notebooks at once on a 2-core machine, and
# oversubscribed threads make small 3D convolutions many times slower
export MPLBACKEND=Agg PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# the real-data cells of the notebooks read $BRATS_NB_DATA; the project's shared real cases when they are beside the clone
if [ -z "${BRATS_NB_DATA:-}" ] && [ -d ../shared/real ]; then export BRATS_NB_DATA=$(cd ../shared/real && pwd); fi
echo "BRATS_NB_DATA=${BRATS_NB_DATA:-<unset: real-data cells skip>}"
step "nbdev_test (every notebook, skipping the slow and cuda flags)"
nbdev_test --n_workers 2 --timing

step "pytest"
python -m pytest tests -n 2 --dist loadfile -p no:cacheprovider "$@"
