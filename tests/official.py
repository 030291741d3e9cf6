"""What the cross-checks against official implementations share: a throwaway virtual environment for packages whose
pins clash with brats_nb's, and the comparison of their numbers with ours (NaN equals NaN, inf equals inf)."""
import subprocess
import sys
import time

import numpy as np
import pytest


def throwaway_venv(root, pins, runner):
    "A venv under `root` with `pins` installed and `runner` written beside it: (its python, root); skips where pip cannot."
    venv, t0 = root / "venv", time.time()
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot make a virtual environment: {r.stderr[-300:]}")
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pins], capture_output=True, text=True, timeout=900)
    if r.returncode:
        pytest.skip(f"cannot install {pins} for Python {sys.version_info.major}.{sys.version_info.minor} "
                    f"(no package registry, or no wheels for these pins?): {r.stderr[-500:]}")
    print(f"\nreference environment {pins} installed in {time.time() - t0:.1f} s")
    (root / "runner.py").write_text(runner)
    return venv / "bin" / "python", root


def close(a, b, tol):
    if a is None or b is None: return a is None and b is None
    if np.isnan(a) or np.isnan(b): return bool(np.isnan(a) and np.isnan(b))
    if np.isinf(a) or np.isinf(b): return a == b
    return abs(a - b) <= tol


def compare(items, keys):
    """`items`: (label, official dict, our dict); `keys`: (official key, our key, tolerance). Returns the largest finite
    difference per key and the list of mismatches."""
    worst, bad = {}, []
    for label, t, o in items:
        for tk, ok, tol in keys:
            a, b = t[tk], o[ok]
            if a is not None and b is not None and np.isfinite(a) and np.isfinite(b):
                worst[ok] = max(worst.get(ok, 0.0), abs(float(a) - float(b)))
            if not close(a, b, tol): bad.append(f"{label} {ok}: official {a}, ours {b}")
    return worst, bad
