"""What a parameter is: a typed field with a default, a check, a doc and a kind.

Every field says what changing it does (`kind` in the field metadata):
- "output" (default): the stage's outputs change; the stage and everything
  downstream become stale and are recomputed.
- "eval": only the evaluation of the outputs changes (a threshold sweep); the
  stage re-evaluates its existing outputs without recomputing them.
- "runtime": neither (worker counts, device, cache folder); never stale.
Fingerprints (`store`) hash only "output" fields. A field added after runs
were made names its `neutral` value: the value at which it computes what the
code before it did; at that value it is left out of the fingerprints, so a
new parameter does not make finished runs stale. A field typed `Path` is a
user path, resolved against the parameter file's folder.

Every number has a range: a value that passes the config layer can never
crash a stage after it cleared the previous results (an overflowing seed, an
epoch count no run reaches, an infinite rate).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Callable


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names file and key.

    `key`: the dotted key at fault, when there is one (the loader then names
    the `--set` that set it rather than the YAML file)."""

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key


KINDS = ("output", "eval", "runtime")
Check = Callable[[Any], "str | None"]
_NONE = object()  # no neutral value


def param(default: Any, check: Check | None = None, doc: str = "", kind: str = "output",
          neutral: Any = _NONE, seed: bool = False) -> Any:
    """A parameter with a default value, an optional check, a short doc, its
    kind (what changing it makes stale) and, for a field added after runs were
    made, its `neutral` value (see the module docstring). `seed`: a training
    seed: runs that differ only in such fields are replicates of one
    experiment (`compare` pools them into one row; `wsss sweep --seeds`)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    if kind not in KINDS:
        raise TypeError(f"kind must be one of {KINDS}")
    meta = {"check": check, "doc": doc, "kind": kind, **({"seed": True} if seed else {})}
    return field(default=default, metadata=meta if neutral is _NONE else {**meta, "neutral": neutral})


def subsection(cls: type, **defaults: Any) -> Any:
    """A sub-section; `defaults` override the section class's own defaults here
    (keys the YAML leaves out keep these values)."""
    return field(default_factory=(lambda: cls(**defaults)) if defaults else cls)


# --------------------------------------------------------------------------- checks
def unit(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v!r}"


def probability(v: Any) -> str | None:
    """Strictly inside (0, 1): a probability a log can be taken of, and of its complement."""
    return None if 0.0 < v < 1.0 else f"must be strictly between 0 and 1, got {v!r}"


def non_empty(v: Any) -> str | None:
    return None if len(v) > 0 else "must not be empty"


def each(check: Check) -> Check:
    def run(values: Any) -> str | None:
        for i, v in enumerate(values):
            msg = check(v)
            if msg:
                return f"item {i}: {msg}"
        return None

    return run


def all_of(*checks: Check) -> Check:
    def run(v: Any) -> str | None:
        for c in checks:
            msg = c(v)
            if msg:
                return msg
        return None

    return run


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def in_range(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v!r}"


def positive_upto(hi: float) -> Check:
    return lambda v: None if 0 < v <= hi else f"must be > 0 and <= {hi}, got {v!r}"


def ordered_pair(v: Any) -> str | None:
    if len(v) != 2:
        return f"must have exactly 2 values, got {len(v)}"
    return None if v[0] <= v[1] else f"must be (low, high) with low <= high, got {list(v)}"


SEED: Check = in_range(0, 2**32 - 1)  # numpy's and torch's generators take any seed in this range
COUNT: Check = in_range(1, 10**9)
EPOCHS: Check = in_range(1, 100_000)
BATCH: Check = in_range(1, 65_536)
LR: Check = positive_upto(10.0)
LR_MULT: Check = positive_upto(100.0)
WEIGHT_DECAY: Check = in_range(0.0, 1.0)
WORKERS: Check = in_range(0, 256)
SCALE: Check = positive_upto(8.0)
PIXELS: Check = positive_upto(1000.0)
WEIGHT: Check = in_range(0.0, 1000.0)
OUTPUT_STRIDE: Check = lambda v: None if v in (8, 16) else f"must be 8 or 16, got {v!r}"  # noqa: E731
