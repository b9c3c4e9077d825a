"""The postcopy serving loop's state: its phase, what each phase waits for, and
the state the loop and its message dispatch share (:mod:`.postcopy`)."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Dict, List, Optional, Set, Tuple

from .. import migstream as ms

if TYPE_CHECKING:
    from .blocks import SourceBlock
    from .sender import Channel

__all__ = ["Phase", "LoopState", "awaited"]


class Phase(enum.Enum):
    """Where the serving loop is."""

    AWAIT_PONG2 = "await-pong2"   # preempt: the preamble sent, the package waits for PONG 2
    PACKAGE = "package"           # the package (LISTEN, the devices, RUN) is queued
    BITMAPS = "bitmaps"           # recovery: the received-page bitmaps are coming
    AWAIT_ACK = "await-ack"       # recovery: POSTCOPY_RESUME sent, RESUME_ACK awaited
    SERVING = "serving"           # requests answered; the stream runs once PONG 3 came


#: what a phase waits for from the destination (the stall error names it)
WAITS = {
    Phase.AWAIT_PONG2: "the destination to accept the migration stream (PONG 2)",
    Phase.BITMAPS: "the destination's received-page bitmaps (RECV_BITMAP)",
    Phase.AWAIT_ACK: "the destination to resume the load (RESUME_ACK)",
}


class LoopState:
    """The serving loop's state, shared by the loop and its message dispatch.

    A plain class (a dataclass costs 1 ms to make, on the way to the connect).
    """

    __slots__ = ("sid", "phase", "pongs", "bitmaps", "stream_ok", "ended", "shut", "around")

    def __init__(self, sid: int) -> None:
        self.sid = sid                            # the "ram" section's id
        self.phase = Phase.SERVING
        self.pongs: Set[int] = set()
        self.bitmaps: Dict[str, ms.RecvBitmap] = {}
        self.stream_ok = False    # the stream starts once the devices are loaded (PONG 3)
        self.ended = False        # END and EOF are queued
        self.shut = False         # SHUT came: the destination is done
        #: fault-around still to build after this read: (block, first unit, channel)
        self.around: List[Tuple[SourceBlock, int, Channel]] = []


def awaited(st: LoopState, main: "Channel", urgent: Optional["Channel"]) -> Optional[str]:
    """What the loop waits for from the destination now, or None (serving demand is no wait)."""
    if st.phase in WAITS:
        return WAITS[st.phase]
    if main.busy or (urgent is not None and urgent.busy):
        return "the destination to read what was sent (the socket is full)"
    if not st.stream_ok:
        return "the destination to load the device state (PONG 3)"
    if st.ended:
        return "the destination to end the load (SHUT) after EOF"
    return None
