"""Default deadlines: how long a round may take, derived from the model's size and the tree.

A round has ``2 * depth + 1`` *phases*, each a wait for the level below it:

* phase ``L`` (``0 <= L < depth``): the actors of level ``L`` collect their groups' shares;
* phase ``depth``: the root actors exchange their partial sums;
* phase ``depth + 1 + j``: the result travels down to the participants of level
  ``depth - 1 - j``.

Each phase gets a fixed latency allowance plus the time to move the worst
case of one phase through one link (an actor may receive a dense share from
every participant of its group: ``group_size`` vectors of ``8 * elements``
bytes), and the whole round gets a fixed allowance for connection set-up and
CURVE handshakes on top. The defaults assume a slow link (100 Mbit/s) on
purpose: a deadline exists to end a round that will never finish, not to
race a healthy one.

The scheduler puts the round's budget in the assignment (``deadline_s``);
every peer derives its per-phase deadlines from it with :func:`phase_deadline`,
so the phase that failed is named by whoever noticed first.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_secagg.errors import ConfigurationError


@dataclass(frozen=True)
class DeadlinePolicy:
    """The knobs of the default round budget.

    Attributes:
        setup_s: Fixed allowance per round (connections, handshakes, encoding).
        per_phase_s: Fixed allowance per phase (latency, scheduling noise).
        link_bytes_per_s: Assumed worst-case throughput of one link.
        max_s: Upper bound of any derived budget.
    """

    setup_s: float = 10.0
    per_phase_s: float = 2.0
    link_bytes_per_s: float = 12.5e6
    max_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("setup_s", "per_phase_s", "link_bytes_per_s", "max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"DeadlinePolicy.{name} must be > 0, got {value!r}")

    def phase_budget(self, vector_bytes: int, group_size: int) -> float:
        """Seconds one phase may take: latency plus ``group_size`` dense vectors over one link.

        Capped at ``max_s``: the byte count is compared as an exact int before any
        division, so no size, however absurd, can overflow the float conversion.
        """
        moved = group_size * vector_bytes
        if moved >= self.max_s * self.link_bytes_per_s:  # int vs float: exact, never raises
            return self.max_s
        return min(self.max_s, self.per_phase_s + moved / self.link_bytes_per_s)

    def round_budget(self, vector_bytes: int, depth: int, group_size: int) -> float:
        """Seconds a whole round may take (capped at ``max_s``).

        Args:
            vector_bytes: Bytes of one encoded vector (8 per element, count slot included).
            depth: Levels of the round's tree.
            group_size: Participants per group.
        """
        phase = self.phase_budget(vector_bytes, group_size)
        if phase >= self.max_s:
            return self.max_s
        return min(self.max_s, self.setup_s + num_phases(depth) * phase)


DEFAULT_POLICY = DeadlinePolicy()


def num_phases(depth: int) -> int:
    """Phases of a round whose tree has ``depth`` levels: up, root exchange, down."""
    return 2 * depth + 1


def phase_deadline(assigned_at: float, deadline_s: float, depth: int, phase: int) -> float:
    """When ``phase`` must be complete, for a round assigned at ``assigned_at``.

    The round's budget is split evenly over its phases, the first phase getting
    two shares (it also pays for connection set-up); the last phase ends with the
    round's deadline itself.
    """
    n = num_phases(depth)
    phase = max(0, min(phase, n - 1))
    return assigned_at + deadline_s * (phase + 2) / (n + 1)


def describe_phase(depth: int, phase: int) -> str:
    """Human-readable name of a phase, for errors and logs."""
    if phase < depth:
        return f"phase {phase} (shares of level {phase})"
    if phase == depth:
        return f"phase {phase} (root exchange)"
    return f"phase {phase} (result down to level {2 * depth - phase})"
