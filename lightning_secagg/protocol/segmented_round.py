"""One peer's part in one round, with the model moved through the tree in segments.

Why segments: a round that moves whole vectors makes every peer hold several
model-sized buffers at once (its encoded vector, the payloads it received and
opened, the sealed copies waiting in ZeroMQ's queues, the decoded result), and
each level of the tree waits for the whole vector of the level below. Cut into
segments, every one of those buffers is segment-sized, and a segment climbs
the tree while the next one is still being shared below it.

Each segment is a round of :class:`PeerRound` (same tree, same links, its own
dense shares), its vector carrying its own copy of the count slot so that a
root actor decodes it as soon as its sum is complete
(:func:`lightning_secagg.schema.segment_bounds`). Its result is the slice of
the result buffer that the segment decodes into
(:func:`lightning_secagg.schema.result_span`), so the slices tile the buffer.
How long segments are is part of the protocol, derived from the schema by
every member alike (:func:`lightning_secagg.schema.segment_elements_for`).

The seeds are the round's, not a segment's (:class:`LevelSeeds`): a
participant draws them once per level and sends each once; segment ``k`` is
masked with the ``k``-th keystream of each. A seed share names segment 0 and
stands for every segment; an actor keeps it and each segment's sum takes it in
when it starts. With one seed message per segment, seeds were half of a
round's messages.

Flow control: a peer has at most ``window`` segments of its own in flight: it
shares segment ``k + window`` once it holds the result of segment ``k``. That
bounds what any peer can be sent at once (a window of segments from each
participant of the groups it acts for), so the buffers waiting in its queues
are bounded too, without acknowledgements of any kind. It cannot deadlock:
segment ``k`` needs only segments ``<= k`` to have been shared, and every
peer shares its first ``window`` segments at once.

Like :class:`PeerRound`, this object never touches a socket, a clock or a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lightning_secagg.errors import LocalProtocolError, RemoteProtocolError
from lightning_secagg.messages import Message, Partial, Result, Share
from lightning_secagg.protocol.peer_round import LevelSeeds, PeerRound, Send
from lightning_secagg.sharing import RandomBytes
from lightning_secagg.tree import AggregationTree

#: Segments of its own a peer keeps in flight (see the module's docstring).
DEFAULT_WINDOW = 2


class SegmentedRound:
    """The state of one peer in one round whose model travels in segments.

    Args:
        me: This peer's id.
        round_id: The round's id.
        tree: The round's tree.
        sizes: Ring elements of each segment's vector (count slot included).
        dtype: The round's ring (``uint32`` or ``uint64``).
        spans: Each segment's ``[lo, hi)`` bytes of the result buffer; they must
            tile ``[0, result_nbytes)`` in order.
        encode: ``encode(k)`` returns segment ``k``'s encoded vector, called
            when the segment is shared (so only a window of them exists at once).
        finalize: ``finalize(k, total, out)`` decodes segment ``k``'s ring total
            into ``out`` (its slice of the result buffer, not initialized: it
            must write every byte, padding included) and returns ``out``; only
            root actors call it.
        random_bytes: Randomness for the seeds.
        window: Segments of its own this peer keeps in flight.
        sends_are_copied: As for :class:`PeerRound`.
    """

    def __init__(
        self,
        me: str,
        round_id: str,
        tree: AggregationTree,
        sizes: Sequence[int],
        dtype: np.dtype,
        spans: Sequence[tuple[int, int]],
        encode: Callable[[int], np.ndarray],
        finalize: Callable[[int, np.ndarray, np.ndarray], np.ndarray],
        random_bytes: RandomBytes,
        *,
        window: int = DEFAULT_WINDOW,
        sends_are_copied: bool = False,
    ) -> None:
        if not sizes or len(sizes) != len(spans):
            raise LocalProtocolError("give one size and one result span per segment")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise LocalProtocolError(f"window must be an int >= 1, got {window!r}")
        pos = 0
        for lo, hi in spans:
            if lo != pos or hi <= lo:
                raise LocalProtocolError("the result spans must tile the result buffer in order")
            pos = hi
        self.me = me
        self.round_id = round_id
        self.tree = tree
        self.window = window
        self.dtype = np.dtype(dtype)
        self._encode = encode
        self._spans = list(spans)
        #: The result buffer: every segment's result lands in its slice, so every
        #: byte is written before the round is done (no zero-fill of the model).
        self.buffer = np.empty(pos, dtype=np.uint8)
        seeds = LevelSeeds(segments=len(sizes))
        self.segments = [
            PeerRound(
                me,
                round_id,
                tree,
                None,
                self._finalizer(k, finalize),
                hi - lo,
                random_bytes,
                sends_are_copied=sends_are_copied,
                segment=k,
                size=size,
                dtype=dtype,
                seeds=seeds,
            )
            for k, (size, (lo, hi)) in enumerate(zip(sizes, spans, strict=True))
        ]
        self._next = 0  # the next segment of ours to share
        self._placed = [False] * len(self.segments)
        self._num_placed = 0
        self._first_unplaced = 0  # segments below it are all placed
        self.started = False

    def _finalizer(
        self, k: int, finalize: Callable[[int, np.ndarray, np.ndarray], np.ndarray]
    ) -> Callable[[np.ndarray], np.ndarray]:
        lo, hi = self._spans[k]
        # A root actor decodes straight into its slice of the result buffer. The
        # closure holds the slice, not ``self``: a cycle through this object would
        # keep every round's model-sized result buffer alive until the garbage
        # collector's next full pass.
        out = self.buffer[lo:hi]

        def decode(total: np.ndarray) -> np.ndarray:
            # finalize writes every byte of the slice, its alignment padding with
            # zeros: the padding is sent down as it is, and must not carry
            # whatever this process's memory held before.
            return finalize(k, total, out)

        return decode

    # -- what the peer asks -----------------------------------------------

    @property
    def done(self) -> bool:
        """True once every segment's result is held (and forwarded)."""
        return self._num_placed == len(self.segments)

    @property
    def result(self) -> np.ndarray | None:
        """The whole result buffer once :attr:`done`, else None."""
        return self.buffer if self.done else None

    @property
    def roles(self) -> tuple[str, ...]:
        """This peer's roles (the same in every segment)."""
        return self.segments[0].roles

    @property
    def shared(self) -> int:
        """How many segments this peer has shared so far (segments ``0 .. shared - 1``)."""
        return self._next

    @property
    def in_flight(self) -> int:
        """Segments this peer has shared whose result it does not hold yet."""
        # Only shared segments get results, so this is O(1), not a scan.
        return self._next - self._num_placed

    def pending(self) -> list[tuple[int, int]]:
        """``(segment, phase)`` for every started segment this peer still waits in.

        Deadlines run per segment, from the moment the peer shared it: a
        segment shared late (behind the window) is not late for that.
        """
        out = []
        for k in range(self._first_unplaced, self._next):
            phase = self.segments[k].pending_phase()
            if phase is not None:
                out.append((k, phase))
        return out

    def waiting_for(self) -> str:
        """What this peer still waits for, for timeout errors."""
        for k in range(self._first_unplaced, len(self.segments)):
            if not self._placed[k]:
                seg = self.segments[k]
                what = seg.waiting_for()
                if len(self.segments) == 1:
                    return what
                return f"segment {k} of {len(self.segments)}: {what}"
        return "nothing"

    def result_slot(self, segment: int, sender: str, nbytes: int) -> np.ndarray | None:
        """Where ``segment``'s result from ``sender`` may be decrypted: its slice of :attr:`buffer`.

        Only while this peer waits for exactly that (a segment it has shared and
        holds no result of, from the actor it expects the result from, of the
        slice's size); None otherwise, and the message is opened into a buffer
        of its own for :meth:`receive` to refuse with its reason. A result
        opened into its slice is then accepted without a copy; one that fails
        authentication leaves bytes there that the right result overwrites.
        """
        if type(segment) is not int or not self._first_unplaced <= segment < self._next:
            return None
        seg = self.segments[segment]
        lo, hi = self._spans[segment]
        # A placed segment holds its result too, so ``result`` says both.
        if seg.result is not None or seg.result_from is None or sender != seg.result_from:
            return None
        return self.buffer[lo:hi] if nbytes == hi - lo else None

    # -- driving it --------------------------------------------------------

    def start(self) -> list[Send]:
        """Share the first ``window`` segments.

        Raises:
            LocalProtocolError: called twice.
        """
        if self.started:
            raise LocalProtocolError("round already started")
        self.started = True
        return self._fill_window()

    def receive(self, message: Message, *, payload_owned: bool = False) -> list[Send]:
        """Route one message to its segment; return what to send in consequence.

        Raises:
            RemoteProtocolError: the message belongs to no segment of this round,
                or its segment refuses it. State unchanged.
        """
        if not isinstance(message, (Share, Partial, Result)):
            raise RemoteProtocolError(f"unexpected {type(message).__name__} between peers")
        if isinstance(message, Share) and message.seed is not None:
            return self._receive_seed(message)
        k = message.segment
        if not 0 <= k < len(self.segments):
            raise RemoteProtocolError(
                f"{message.TYPE} for segment {k} of a round of {len(self.segments)} segments"
            )
        out = self.segments[k].receive(message, payload_owned=payload_owned)
        return out + self._settle()

    def _receive_seed(self, message: Share) -> list[Send]:
        """A seed for every segment: booked once, taken in by each started segment's sum."""
        key = (message.level, message.group)
        out = self.segments[0].receive(message)  # validates and books it (the book is shared)
        for seg in self.segments[1:]:
            out += seg.apply_seed(key, message.sender)
        return out + self._settle()

    def _settle(self) -> list[Send]:
        """Place every segment whose result has come, then share what the window allows.

        Only shared segments can have a result (each needs this peer's own
        share), so the scan covers the few between the first unplaced one and
        the next to share. Before :meth:`start` (shares that raced ahead of the
        assignment) nothing is placed and nothing of ours is shared.
        """
        for k in range(self._first_unplaced, self._next):
            if self.segments[k].result is not None and not self._placed[k]:
                self._place(k)
        return self._fill_window() if self.started else []

    def _place(self, k: int) -> None:
        """Put segment ``k``'s result into its slice of the buffer (a root actor's is there)."""
        seg = self.segments[k]
        lo, hi = self._spans[k]
        view = self.buffer[lo:hi]
        result = seg.result
        if result is not None and result.ctypes.data != view.ctypes.data:
            # A result received into a buffer of its own; a root actor decodes
            # into the view, and a result opened into its slot is there already.
            view[:] = result
        # The segment's own buffer is released; sends already made keep theirs.
        seg.result = view
        self._placed[k] = True
        self._num_placed += 1
        while self._first_unplaced < len(self._placed) and self._placed[self._first_unplaced]:
            self._first_unplaced += 1

    def _fill_window(self) -> list[Send]:
        out: list[Send] = []
        while self._next < len(self.segments) and self.in_flight < self.window:
            k = self._next
            # Counted as shared only once it is: an encoding error leaves it unshared.
            out += self.segments[k].start(self._encode(k))
            self._next += 1
            if self.segments[k].result is not None:
                # Our own share was the last piece: a root actor whose partner's
                # partial sum is in, the partner having our seed for every segment.
                self._place(k)
        return out
