"""The small exception hierarchy shared by every part of lightning_secagg.

Callers catch :class:`SecAggError` for "anything this library refused or could
not finish"; the subclasses let them tell apart a bad argument (fix your code),
bad data (fix your model), and a round that failed on the network (retry).
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by lightning_secagg."""


class ConfigurationError(SecAggError, ValueError):
    """A parameter is out of range; the message names it, the allowed values and what was given."""


class EncodingError(SecAggError, ValueError):
    """A state dict cannot be encoded safely (NaN/Inf, overflow risk, unsupported dtype).

    Raised before anything leaves the process, so a refused round never leaks
    a partial share.
    """


class ProtocolError(SecAggError):
    """A message broke the protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids now (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """A remote party sent something malformed or unexpected; it is dropped, never trusted."""


class RoundFailedError(SecAggError):
    """An aggregation round did not produce a result."""


class RoundTimeoutError(RoundFailedError, TimeoutError):
    """A round missed its deadline; the message says what the peer was still waiting for."""


class RoundAbortedError(RoundFailedError):
    """The scheduler aborted the round (another member failed or gave up)."""


class SignupRejectedError(RoundFailedError):
    """The scheduler refused our sign-up (e.g. the model schema differs from the session's)."""


class InvalidTotalError(RoundFailedError):
    """The round's ring total cannot be decoded (its count slot is not positive).

    Honest peers never produce it; it means a member sent a wrong share or
    partial sum. Nothing is returned from such a round.
    """


class ResultMismatchError(RoundFailedError):
    """Members of a round do not all hold the same result and total weight.

    Raised, on every honest member, when the agreement check after decoding
    finds a digest that differs from ours or is missing by the deadline. It
    means some member (or a forwarding actor) changed a sum: the round's result
    cannot be trusted. Not retried blindly by the callback: ``on_failure``
    decides, and the culprits named in :attr:`disagreeing` should be looked at.

    Attributes:
        disagreeing: Peer ids whose digest differed from ours or never came.
    """

    def __init__(self, message: str, disagreeing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.disagreeing = disagreeing


class PeerIdInUseError(RoundFailedError):
    """Another key holds this peer id (queued or in a round); retry once it is released.

    Not a :class:`SignupRejectedError`: a crashed peer restarted under the same id
    gets in once the scheduler has found its old incarnation dead.
    """


class ForeignMemberError(RoundFailedError):
    """An assignment names a member whose CURVE key is outside this peer's roster.

    The peer refuses the round before sending anything (the scheduler is told,
    and aborts it for everyone), so an outsider, a sybil of an outsider's key,
    or a malicious scheduler's own key never receives a share. Retried within
    the call's ``max_retries`` only: an honest scheduler may have admitted a
    stale key, while a malicious one gets no more tries than the caller allows.
    The message names the key by its fingerprint, never the key itself.
    """


class SchemaMismatchError(SignupRejectedError, ValueError):
    """The model's names, shapes or dtypes differ from those of the session's other peers."""


class TooFewPeersError(SignupRejectedError):
    """The session cannot form a round: peers of it left for good and too few remain.

    Not retried (a new sign-up would wait for the same missing peers); the
    scheduler's rule is in :class:`~lightning_secagg.protocol.scheduler_state.SchedulerState`.
    """


class PreflightError(SecAggError):
    """The peer could not reach the scheduler before any round (see ``Peer.preflight``)."""


class SchedulerUnreachableError(PreflightError, ConnectionError):
    """Nothing answered at the scheduler's address: it is not running, or the address is wrong."""


class SchedulerKeyError(PreflightError):
    """The scheduler refused the CURVE handshake: the ``scheduler_key`` given is not its key."""
