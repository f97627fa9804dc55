"""tools/fastv_coverage.py on a few images: the share of object patches FastV's ranking keeps grows with the
budget and stays a share."""

from __future__ import annotations

import sys

from tests.conftest import ROOT


def test_object_coverage_grows_with_the_budget(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import fastv_coverage

    share = fastv_coverage.main(["--images", "4"])
    assert list(share) == [64, 128, 192]
    assert 0.0 < share[64] <= share[128] <= share[192] <= 1.0
    assert "FastV keeping 128:" in capsys.readouterr().out
