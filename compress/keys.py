"""What a recipe value changes, for the run directory's keys (`compress.rundir`), and how keys are hashed.

Every recipe field has a role. By default it changes the weights, hence every artifact downstream (the artifact
key). A field marked `EVALUATION` changes only what is measured: a stage whose key changed but whose artifact key
did not is re-evaluated, resuming its finished training checkpoint. A field marked `NO_EFFECT` changes neither.
"""

from __future__ import annotations

import hashlib
import json

KEY_SCHEME = 2  # bump when keys change meaning: older run directories are refused, not silently reused

ROLE_WEIGHTS, ROLE_EVALUATION, ROLE_NONE = "weights", "evaluation", "none"
# pydantic `json_schema_extra` markers of a field's role (unmarked fields change the weights)
NO_EFFECT = {"key": ROLE_NONE}  # neither weights nor results: never recomputes anything
EVALUATION = {"key": ROLE_EVALUATION}  # what is measured, not the weights: re-evaluates, reuses training checkpoints
# changes the weights when set; None stands for a value every key already holds (the recipe's seed), so a field of
# this kind added to a section leaves the keys of existing run directories as they were
KEYED_WHEN_SET = {"key": ROLE_WEIGHTS, "when_set": True}


def role_of(field) -> str:
    """The role of a pydantic field: ROLE_WEIGHTS, ROLE_EVALUATION or ROLE_NONE."""
    return (field.json_schema_extra or {}).get("key", ROLE_WEIGHTS)


def digest(obj) -> str:
    """The short hash keys are made of (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
