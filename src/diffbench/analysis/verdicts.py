"""Every word the report states a verdict in, owned here so that the inference, the claims, the
settledness and the renderers say the same thing: a renderer writes the enum's value, a test
compares against the enum, and no other module spells a verdict."""

from __future__ import annotations

from enum import StrEnum


class Verdict(StrEnum):
    """A directional claim or part holds, is contradicted or is not shown; an equivalence test
    finds the arms equivalent, different or neither; a claim without parts is not tested."""

    HOLDS = "holds"
    CONTRADICTED = "contradicted"
    NOT_SHOWN = "not shown at this n"
    EQUIVALENT = "equivalent"
    DIFFERENT = "different"
    UNDETERMINED = "undetermined"
    NOT_TESTED = "not tested"

    @property
    def opposite(self) -> Verdict | None:
        """The outcome that contradicts this one (holds ↔ contradicted, equivalent ↔ different)."""
        return _OPPOSITES.get(self)


_OPPOSITES = {
    Verdict.HOLDS: Verdict.CONTRADICTED,
    Verdict.CONTRADICTED: Verdict.HOLDS,
    Verdict.EQUIVALENT: Verdict.DIFFERENT,
    Verdict.DIFFERENT: Verdict.EQUIVALENT,
}

NO_VERDICT = "plumbing check: no verdict"
"""What a smoke-profile report states in place of every verdict."""


class Outcome(StrEnum):
    """Claim 3's (c) in words: the heads' training outcomes under one weighting, from its TOST."""

    EQUIVALENT = "equivalent training outcomes"
    DIFFERENT = "different training outcomes"
    UNDETERMINED = "training outcomes undetermined"

    @classmethod
    def of(cls, differ: int, equal: int, tests: int) -> Outcome:
        """Different if any weighting's heads differ, equivalent if every one's are equivalent."""
        if differ:
            return cls.DIFFERENT
        return cls.EQUIVALENT if equal == tests else cls.UNDETERMINED


class Standing(StrEnum):
    """Whether a verdict belongs to the optimum: the same at the last budgets and the optimiser
    settings that test it, or provisional."""

    SETTLED = "settled"
    PROVISIONAL = "provisional"
