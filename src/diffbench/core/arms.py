"""An arm as a value: the pair (head, weighting) that one trained network stands for.

Names are made and read here only. A head's own unweighted MSE is the weighting `own`, written
`simple` in names (`eps_simple`), and it is the same loss as the weighting named after the head
(`eps_simple` and `eps_eps` train one objective), which `objective` makes visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS

OWN = "own"
OWN_NAME = "simple"
"""How `own` is written in arm names, and how schema-1 results spelled the weighting."""


@dataclass(frozen=True)
class Arm:
    """What the network predicts (`head`) and how the loss weighs ‖ε − ε̂‖² over t (`weighting`)."""

    head: str
    weighting: str

    def __post_init__(self) -> None:
        if self.weighting == OWN_NAME:
            object.__setattr__(self, "weighting", OWN)
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; heads are {', '.join(HEADS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; weightings are {', '.join(WEIGHTINGS)}")

    @classmethod
    def parse(cls, label: str) -> Arm:
        """`x0_elbo_is` → Arm("x0", "elbo_is"); heads have no underscore, weightings may."""
        head, _, weighting = label.partition("_")
        return cls(head, weighting)

    @property
    def label(self) -> str:
        """`<head>_<weighting>`, `own` written `simple`: eps_simple, x0_elbo, score_minsnr, …"""
        return f"{self.head}_{OWN_NAME if self.weighting == OWN else self.weighting}"

    @property
    def objective(self) -> Arm:
        """The arm with this very loss in canonical form: the weighting named after the head is
        the head's own MSE (w_ε = 1/c_head), so (eps, eps) and (eps, own) are one objective."""
        return Arm(self.head, OWN) if self.weighting == self.head else self

    @property
    def order(self) -> tuple[int, int]:
        """Display order: by head, then by weighting, as the registries list them."""
        return list(HEADS).index(self.head), list(WEIGHTINGS).index(self.weighting)

    def __str__(self) -> str:
        return self.label
