"""The error a pruning request the model cannot satisfy raises (an unreachable target, a missing runtime): one
line naming the recipe key, which the CLI prints as it is."""

from compress.errors import UserError


class PruneError(UserError, ValueError):
    """A pruning target or setting this model cannot meet, said in one line."""
