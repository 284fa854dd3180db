"""The one timing engine: every latency this project reports, compares or plans with is timed here.

How a set of jobs is timed (`run_rounds`):
- A job is anything that can be opened and called: an ONNX session, a compiled model, a torch model, a training
  step. Its opener (given by the caller) starts it and returns its steps, each a zero-argument call (one series
  of timings per step: a session timed at several batch sizes gives one step per batch).
- Rounds alternate over the jobs: each round opens every job once, in turn, times each of its steps (`warmup`
  untimed calls, then `iters` timed ones) and drops it before the next job opens, so one session is alive at a
  time. Each round starts later in the order than the one before, so no job always follows the same one.
- A slow drift of the machine (clocks, caches, other work) then reaches every job of a round alike, which is
  why ratios are taken within a round.

What is kept: every timed call, by series and round. Per round, its fastest call and its median (`Series`).

The statistic the product reports (`Series.fastest`, `ratio`): a series' latency is its fastest call over all
rounds, because other work on a shared machine only ever adds time: the fastest call is the one it disturbed
least. The ratio of two series is the median over rounds of the ratio of their fastest calls in the same round:
within a round both saw nearly the same machine, so the drift cancels, and the median leaves out a round that
other work slowed for one series and not the other. Each round's median is recorded beside it.

The quiet-round rule (`undisturbed`, `until_quiet`): a round whose fastest call of a series lies more than
DISTURBED above that series' fastest round was disturbed by other work. Other work comes in stretches that can
cover most of a fixed number of rounds, so with `Counts.max_rounds` above `Counts.rounds`, rounds continue until
every series has QUIET_ROUNDS undisturbed ones, at most `max_rounds` in all. A caller may give another rule for
the rounds past `rounds` (`until_blocks_agree`, or the jobs a latency table times again).

How many calls and rounds each use takes (`Counts`) is declared here, together, with the reason for each.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Step = Callable[[], object]  # one timed call; what it returns stays where the job left it (host or device)
Opener = Callable[[], Mapping[Hashable, Step]]  # starts a job and gives its steps by series key
Clock = Callable[[], float]  # seconds

DISTURBED = 1.10  # a round's fastest call this far above the series' fastest round: other work slowed it
QUIET_ROUNDS = 3  # undisturbed rounds of every series that rounds past `Counts.rounds` wait for (`until_quiet`)


@dataclass(frozen=True)
class Counts:
    """How one use times its jobs: `warmup` untimed and `iters` timed calls of each step per round, `rounds`
    rounds, and up to `max_rounds` in all (None: `rounds`) while the use's rule for more rounds asks for them.
    `why` says why these numbers."""

    warmup: int
    iters: int
    rounds: int
    max_rounds: int | None = None
    why: str = ""

    def __post_init__(self):
        if self.warmup < 0 or self.iters < 1 or self.rounds < 1:
            raise ValueError(f"timing counts: warmup={self.warmup} (>= 0), iters={self.iters} and "
                             f"rounds={self.rounds} (>= 1)")
        if self.max_rounds is not None and self.max_rounds < self.rounds:
            raise ValueError(f"timing counts: max_rounds={self.max_rounds} is below rounds={self.rounds}")

    @property
    def limit(self) -> int:
        """The most rounds this use may time."""
        return max(self.rounds, self.max_rounds or 0)


# ---- the counts of every use, together ------------------------------------------------------------------------
BENCH = Counts(10, 20, 3, why=(
    "A handful of whole files: 10 calls finish a fresh session's warm-up (allocation, kernel choice), and 20 timed "
    "calls a round give one that misses other work's bursts. The recipe's bench section sets them per run "
    "(bench.warmup, bench.iters, bench.rounds, bench.max_rounds)."))
LATENCY_TABLE = Counts(2, 5, 3, why=(
    "Hundreds of one-layer models: each round must stay short, so few calls per model, and rounds, not long runs, "
    "spread the machine's moods over every model. prune.latency.rounds sets the rounds; timings far above their "
    "peers' trend are timed again in as many rounds more at most."))
MEASURE = Counts(10, 20, 5, max_rounds=20, why=(
    "A few whole models, the plan checked against the unpruned one: the bench's calls per round, so the ratio is "
    "the one the bench will report. Blocks of 5 rounds are timed until two in a row agree within the latency "
    "target's tolerance, 4 blocks at most: one block cannot tell a stretch of other work that slowed one model "
    "more than the other from the ratio itself."))
RUNTIME_CHOICE = Counts(MEASURE.warmup, MEASURE.iters, 3, why=(
    "prune.latency.provider=auto: the unpruned model on each runtime of ONNX files, as the plan check times it; "
    "runtimes differ by far more than what is left of the drift after 3 rounds."))
STEM_CHOICE = Counts(5, 20, 7, why=(
    "The first layer alone through each rewrite: a small model, quickly warm; 7 rounds because a rewrite is chosen "
    "on a margin of a few percent, which the median of same-round ratios must resolve."))
GRAPH_REWRITES = Counts(5, 20, 7, why=(
    "benchmarks/graph_rewrites.py's defaults: as the stem choice, whose rewrites it compares with the whole-graph "
    "clean-up (its flags --warmup, --iters, --rounds)."))
REBRANCH_STEPS = Counts(0, 1, 40, why=(
    "benchmarks/rebranch_step_time.py: two models that train; one step of each per round, so every step of one "
    "is next to a step of the other. The models live on between rounds, so only the first round's steps are cold "
    "(the optimizer's state, the allocator's caches): the fastest step and the median of 40 ratios leave them out, "
    "where warm-up calls would be paid in every round."))
TRAIN_THROUGHPUT = Counts(0, 1, 3, why=(
    "benchmarks/train_throughput.py: a call is a whole training epoch on a fresh model, one of each loop per round "
    "(--rounds). The process's first epoch is cold (kernel and allocator set-up) for whichever loop runs first: "
    "3 rounds let the fastest epoch and the median of same-round ratios leave that round out, where a warm-up epoch "
    "in every round would double the run."))


# ---- timing calls ---------------------------------------------------------------------------------------------
class SelfTimed:
    """A step that times itself: calling `fn` returns the seconds of the part of the call that counts (a training
    epoch without the evaluation that follows it)."""

    def __init__(self, fn: Callable[[], float]):
        self.fn = fn

    def __call__(self) -> float:
        return float(self.fn())


def time_calls(step: Step, warmup: int, iters: int, clock: Clock | None = None) -> list[float]:
    """Milliseconds of each of `iters` calls of `step`, after `warmup` untimed ones; timed by `clock` (seconds,
    default `time.perf_counter`), or by the step itself when it is `SelfTimed`."""
    clock = clock or time.perf_counter
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if isinstance(step, SelfTimed):
            times.append(1000.0 * step())
            continue
        start = clock()
        step()
        times.append((clock() - start) * 1000.0)
    return times


# ---- what is kept, and the statistics -------------------------------------------------------------------------
def undisturbed(round_fastest: Sequence[float]) -> list[bool]:
    """Which rounds timed a series undisturbed: their fastest call within DISTURBED of its fastest over all rounds."""
    at_most = DISTURBED * min(round_fastest)
    return [t <= at_most for t in round_fastest]


@dataclass
class Series:
    """One step's timings: `calls[k]`, the milliseconds of its calls in round `rounds[k]`."""

    calls: list[list[float]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def round_fastest(self) -> list[float]:
        """Each round's fastest call (ms)."""
        return [min(c) for c in self.calls]

    @property
    def round_medians(self) -> list[float]:
        """Each round's median call (ms)."""
        return [statistics.median(c) for c in self.calls]

    @property
    def fastest(self) -> float:
        """The product's latency: the fastest call over all rounds (ms)."""
        return min(self.round_fastest)

    @property
    def median(self) -> float:
        """The median over rounds of each round's median (ms), recorded beside the fastest call."""
        return statistics.median(self.round_medians)

    def percentile(self, q: float) -> float:
        """The `q`th percentile of every timed call of every round (ms)."""
        return float(np.percentile(np.concatenate([np.asarray(c) for c in self.calls]), q))

    def quiet_rounds(self) -> int:
        """How many rounds timed this series undisturbed (`undisturbed`)."""
        return sum(undisturbed(self.round_fastest))

    def since(self, first_round: int) -> Series:
        """The rounds from `first_round` on."""
        kept = [k for k, r in enumerate(self.rounds) if r >= first_round]
        return Series([self.calls[k] for k in kept], [self.rounds[k] for k in kept])


class Timings(dict):
    """{series key: Series} of one `run_rounds`, and `rounds`: how many rounds it timed."""

    rounds: int = 0

    def since(self, first_round: int) -> Timings:
        """Every series' rounds from `first_round` on (series without any left out)."""
        out = Timings({k: s.since(first_round) for k, s in self.items()})
        out = Timings({k: s for k, s in out.items() if s.calls})
        out.rounds = self.rounds
        return out


def ratio_of_rounds(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The product's ratio of two series timed in the same rounds, from each round's fastest call (as stored in
    results, `round_fastest_ms`): the median over rounds of numerator / denominator."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratio of rounds: {len(numerator)} and {len(denominator)} rounds; give the same rounds, "
                         f"at least one")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _same_rounds(numerator: Series, denominator: Series) -> tuple[list[float], list[float]]:
    """The two series' fastest calls in the rounds that timed both, in round order."""
    theirs = dict(zip(denominator.rounds, denominator.round_fastest))
    pairs = [(t, theirs[r]) for r, t in zip(numerator.rounds, numerator.round_fastest) if r in theirs]
    return [a for a, _ in pairs], [b for _, b in pairs]


def round_ratios(numerator: Series, denominator: Series) -> list[float]:
    """Per round both series were timed in: numerator's fastest call / denominator's fastest call."""
    return [a / b for a, b in zip(*_same_rounds(numerator, denominator))]


def ratio(numerator: Series, denominator: Series) -> float:
    """The product's ratio numerator / denominator: `ratio_of_rounds` over the rounds that timed both."""
    mine, theirs = _same_rounds(numerator, denominator)
    if not mine:
        raise ValueError("ratio: the two series share no round")
    return ratio_of_rounds(mine, theirs)


# ---- rules for rounds past `Counts.rounds` --------------------------------------------------------------------
More = Callable[[Timings, list[Hashable]], Iterable[Hashable]]  # (timings so far, jobs) -> jobs of the next round


def until_quiet(timings: Timings, jobs: list[Hashable]) -> list[Hashable]:
    """Every job again while some series has fewer than QUIET_ROUNDS undisturbed rounds; none once all have."""
    return [] if all(s.quiet_rounds() >= QUIET_ROUNDS for s in timings.values()) else list(jobs)


def block_ratios(timings: Timings, numerators: Sequence[Hashable], denominator: Hashable, block: int
                 ) -> list[list[float]]:
    """Each complete block of `block` rounds: every numerator series' `ratio` to `denominator` over it."""
    blocks = []
    for first in range(0, timings.rounds - block + 1, block):
        part = {k: s.since(first) for k, s in timings.items()}
        part = {k: Series(s.calls[:block], s.rounds[:block]) for k, s in part.items()}
        blocks.append([ratio(part[k], part[denominator]) for k in numerators])
    return blocks


def blocks_agree(blocks: list[list[float]], tolerance: float) -> bool:
    """Whether the last two blocks give every ratio within `tolerance` of each other."""
    return len(blocks) >= 2 and all(abs(a - b) <= tolerance for a, b in zip(blocks[-1], blocks[-2]))


def until_blocks_agree(numerators: Sequence[Hashable], denominator: Hashable, block: int, tolerance: float) -> More:
    """A rule for more rounds: every job again until two blocks of `block` rounds in a row agree
    (`blocks_agree`) on each numerator's ratio to `denominator`."""

    def more(timings: Timings, jobs: list[Hashable]) -> list[Hashable]:
        done = timings.rounds % block == 0 and blocks_agree(block_ratios(timings, numerators, denominator, block),
                                                            tolerance)
        return [] if done else list(jobs)

    return more


# ---- the rounds -----------------------------------------------------------------------------------------------
RoundLog = Callable[[int, list[Hashable], float, Timings], None]  # (round, jobs timed, seconds, timings so far)


def run_rounds(jobs: Mapping[Hashable, Opener], counts: Counts, more: More | None = None,
               on_round: RoundLog | None = None, clock: Clock | None = None) -> Timings:
    """Time `jobs` ({job key: its opener}) in alternating rounds (see the module docstring): `counts.rounds` rounds
    of every job, then, up to `counts.limit` rounds in all, those `more(timings, jobs)` names (default
    `until_quiet`), stopping when it names none. Round r starts r x max(1, jobs // counts.rounds) jobs later in
    the order (one job with few jobs; spread over the planned rounds with many). `on_round` hears of each round
    as it ends. Returns every step's `Series` by its key (keys must be unique over all jobs)."""
    more = more or until_quiet
    order = list(jobs)
    timings = Timings()
    for r in range(counts.limit):
        keys = order if r < counts.rounds else list(more(timings, order))
        if not keys:
            break
        shift = r * max(1, len(keys) // counts.rounds) % len(keys)
        began = time.perf_counter()
        for key in keys[shift:] + keys[:shift]:
            steps, step = jobs[key](), None
            for name, step in steps.items():
                series = timings.setdefault(name, Series())
                if series.rounds and series.rounds[-1] == r:
                    raise ValueError(f"timing: series {name!r} given by two jobs")
                series.calls.append(time_calls(step, counts.warmup, counts.iters, clock))
                series.rounds.append(r)
            # the job's only references: it is freed before the next one opens. A full collection walks every
            # object torch made (a large fraction of a second, hundreds of times in a latency table); the young
            # generations hold what opening the job made
            steps = step = None
            gc.collect(1)
        timings.rounds = r + 1
        if on_round is not None:
            on_round(r, keys, time.perf_counter() - began, timings)
    return timings
