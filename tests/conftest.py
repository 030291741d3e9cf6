"Shared fixtures: the bundled samples and the real BraTS case (skipped where absent)."
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_BRATS = SHARED / "real" / "brats18"
REAL_DSB = SHARED / "real" / "dsb2018"


@pytest.fixture(scope="session")
def samples():
    from brats_nb.synth import SAMPLES_DIR
    return SAMPLES_DIR


@pytest.fixture(scope="session")
def real_case_dir():
    d = REAL_BRATS / "Brats18_2013_2_1"
    if not d.is_dir():
        pytest.skip(f"real BraTS case not present at {d}")
    return d
