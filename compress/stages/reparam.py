"""Stage `reparam`: the trained multi-branch model converted exactly into its plain stack."""

from __future__ import annotations

from ..context import StageContext
from ..reparam import reparam_stage


def run(c: StageContext) -> dict:
    plain, metrics = reparam_stage(c.load("train"), c.data, c.env)
    c.save("reparam", plain)
    return metrics
