"""Paired bootstrap statistics: moved into the package as :mod:`rb_labelrefine.evaluation.paired`
(issue 22); this name stays for scripts written against it."""
from rb_labelrefine.evaluation.paired import (  # noqa: F401
    __all__, as_points, gap_scores, paired_bootstrap, points_str, verdict_above_zero, verdict_halves,
)
