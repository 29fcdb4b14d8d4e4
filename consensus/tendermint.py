"""Tendermint's round-based BFT algorithm for one height, as a sans-IO state machine.

Theory of operation (Buchman, Kwon, Milosevic, "The latest gossip on BFT consensus", 2018,
arXiv:1807.04938, Algorithm 1; line numbers below are that algorithm's):

A height runs in rounds. In each round one proposer (chosen by stake) proposes a block; every
validator then *prevotes* for it, or for nil if the block is invalid or conflicts with its lock,
and once it sees prevotes for the block from more than 2/3 of the stake (a "polka") it *locks*
on the block and *precommits* it. More than 2/3 of precommits for one block decide it: that set
of signatures is the block's commit certificate. A validator locked on a block prevotes only for
that block in later rounds, unless a newer polka for another block releases it (lines 28-33);
this is what makes two different decisions at one height impossible while at most f of 3f+1
stake is Byzantine (two quorums intersect in an honest validator, which would have had to
precommit both). Rounds that make no progress end by timeouts that grow with the round, so
after the network heals (partial synchrony) some round has an honest proposer and enough time.

What this module adds around the paper's pseudocode:
- Persist before send (as etcd-raft's Ready): every message this validator signs, and its lock,
  go into `SignerState`; the driver writes `Ready.persist` durably before it sends
  `Ready.messages`. A restarted validator reloads it, re-sends what it signed and never signs a
  different vote or proposal for the same (round, kind).
- Retransmission: the paper assumes gossip eventually delivers every message; on a lossy link
  that means re-sending. Each `resend_s` the engine re-sends its own messages of the latest rounds,
  its non-nil prevotes, and (as a re-proposing proposer) the polka that justifies its valid round.
- Waiting for transactions: round 0 neither proposes nor starts its propose timeout until the
  driver calls `wake()` (transactions arrived, or an empty block is due), or a message for this
  height arrives, so an idle chain stays quiet instead of spinning through rounds.
- Equivocation: a second, different vote of one validator for the same (kind, round) becomes
  `Equivocation` evidence, and only its first vote counts.
- Bounds: votes are kept for rounds up to `round + FUTURE_ROUNDS`; line 55's "f+1 messages from
  a higher round" is counted from each validator's highest round seen, so a validator far behind
  still catches up while a Byzantine one cannot fill memory with far-future rounds.
- Invariants are checked after every input (`check_invariants`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from hmnode.identity import NodeId, NodeKey, verify

from .messages import (NIL, PRECOMMIT, PREVOTE, Block, CommitCertificate, Equivocation,
                       MessageRejected, Proposal, Vote, sign_proposal, sign_vote)
from .validators import ValidatorSet

PROPOSE, PREVOTE_STEP, PRECOMMIT_STEP = 0, 1, 2
STEP_NAMES = {PROPOSE: "propose", PREVOTE_STEP: "prevote", PRECOMMIT_STEP: "precommit"}
MAX_VOTES_PER_SLOT = 3
MAX_PROPOSALS_PER_ROUND = 3  # distinct blocks one validator's votes count for, per (kind, round)
FUTURE_ROUNDS = 2  # rounds ahead of ours whose votes are kept (later ones are re-sent to us)
RESEND_ROUNDS = 2  # own messages of this many rounds before ours are re-sent too
MAX_RESEND = 64

Message = Union[Proposal, Vote]


class InvariantViolated(AssertionError):
    """The consensus state broke a rule it must keep: a bug, never an input problem."""


@dataclass(frozen=True)
class Timeouts:
    """Round timeouts (seconds): each grows by its delta per round, as in the paper's
    timeoutPropose(r) = propose_s + r * propose_delta_s."""

    propose_s: float = 1.0
    propose_delta_s: float = 0.5
    prevote_s: float = 0.5
    prevote_delta_s: float = 0.25
    precommit_s: float = 0.5
    precommit_delta_s: float = 0.25
    resend_s: float = 1.0

    def propose(self, round_: int) -> float:
        return self.propose_s + round_ * self.propose_delta_s

    def prevote(self, round_: int) -> float:
        return self.prevote_s + round_ * self.prevote_delta_s

    def precommit(self, round_: int) -> float:
        return self.precommit_s + round_ * self.precommit_delta_s


@dataclass
class SignerState:
    """What a validator must not forget across a crash at this height: where it is, its lock,
    its valid block and every message it signed (encoded)."""

    height: int
    round: int = 0
    step: int = PROPOSE
    locked_round: int = -1
    locked_block: Block | None = None
    valid_round: int = -1
    valid_block: Block | None = None
    sent: dict[tuple[str, int], Message] = field(default_factory=dict)  # (kind, round) -> msg

    def to_wire(self) -> list:
        # The lock, the valid block and our proposals are mostly one block: store each once.
        blocks = {b.block_id: b.encode() for b in (
            [self.locked_block, self.valid_block]
            + [m.block for m in self.sent.values() if isinstance(m, Proposal)]) if b is not None}
        return [self.height, self.round, self.step,
                self.locked_round, None if self.locked_block is None else self.locked_block.block_id,
                self.valid_round, None if self.valid_block is None else self.valid_block.block_id,
                [[kind, r, msg.encode()] for (kind, r), msg in sorted(self.sent.items())
                 if isinstance(msg, Vote)],
                [[r, msg.chain_id, msg.proposer, msg.signature, msg.valid_round,
                  msg.block.block_id]
                 for (kind, r), msg in sorted(self.sent.items()) if isinstance(msg, Proposal)],
                list(blocks.values())]

    @classmethod
    def from_wire(cls, wire: Any) -> "SignerState":
        """Read back what `to_wire` wrote; MessageRejected if it is damaged."""
        try:
            height, round_, step, lr, lid, vr, vid, votes, proposals, raw_blocks = wire
            blocks = {b.block_id: b for b in (Block.decode(raw) for raw in raw_blocks)}
            state = cls(height, round_, step, lr, None if lid is None else blocks[lid],
                        vr, None if vid is None else blocks[vid])
            for kind, r, raw in votes:
                state.sent[(kind, r)] = Vote.decode(raw)
            for r, chain_id, proposer, signature, valid_round, bid in proposals:
                state.sent[("proposal", r)] = Proposal(chain_id, height, r, valid_round,
                                                       blocks[bid], proposer, signature)
        except (ValueError, TypeError, KeyError) as exc:
            raise MessageRejected(f"signer state: malformed ({exc})") from None
        return state


@dataclass
class Ready:
    """What one or more inputs produced: persist first, then send, then act on decisions."""

    persist: SignerState | None = None
    messages: list[Message] = field(default_factory=list)  # to every validator
    decided: tuple[Block, CommitCertificate] | None = None
    evidence: list[Equivocation] = field(default_factory=list)


BlockSource = Callable[[int, int], Block]  # (height, round) -> a new block to propose
BlockCheck = Callable[[Block], "str | None"]  # None when valid, else why not


class Tendermint:
    """One height of Tendermint consensus. Inputs: `receive`, `tick`, `wake`; outputs: `ready`."""

    def __init__(self, chain_id: str, height: int, validators: ValidatorSet,
                 key: NodeKey | None, timeouts: Timeouts, make_block: BlockSource,
                 check_block: BlockCheck, now: float, restored: SignerState | None = None) -> None:
        self.chain_id = chain_id
        self.height = height
        self.validators = validators
        self.key = key if key is not None and key.node_id.key in validators else None
        self.timeouts = timeouts
        self._make_block = make_block
        self._check_block = check_block
        self.state = restored if restored is not None and restored.height == height \
            else SignerState(height)
        self.waiting = restored is None or restored.height != height
        self.decision: tuple[Block, CommitCertificate] | None = None
        # round -> the proposals heard, first first. Only the first is prevoted, but a quorum
        # may form on another one an equivocating proposer showed to others: keeping a few
        # lets this node decide (or lock on) that block without a block sync.
        self.proposals: dict[int, list[Proposal]] = {}
        # (kind, round) -> validator -> block id -> vote: an equivocator's votes count for each
        # block they name (never twice for one block), which is safe (two quorums still share
        # an honest validator) and keeps a polka one node saw countable by the others.
        self.votes: dict[tuple[int, int], dict[bytes, dict[bytes, Vote]]] = {}
        self.highest_round: dict[bytes, int] = {}
        self._valid: dict[bytes, str | None] = {}  # block id -> None (valid) or why not
        self._fired: set[tuple[str, int]] = set()  # the paper's "for the first time" rules
        self._timers: list[tuple[float, str, int]] = []  # (deadline, kind, round)
        self._next_resend = now + timeouts.resend_s
        self._out = Ready()
        self._dirty = False
        self.rejected = 0
        for msg in list(self.state.sent.values()):  # our own messages count for us again
            self._add(msg, own=True)
            self._out.messages.append(msg)
        if not self.waiting:
            self._resume_timers(now)
        self._process(now)

    # --- inputs -------------------------------------------------------------------------------

    def wake(self, now: float) -> None:
        """Transactions are waiting (or an empty block is due): start round 0 in earnest."""
        if self.waiting:
            self.waiting = False
            self._start_round(self.state.round, now)
            self._process(now)

    def receive(self, msg: Message, now: float) -> str | None:
        """A proposal or vote from the network (or a peer's relay of one); returns why it was
        refused (a bad signature, not the proposer, not a validator), or None."""
        why = self._admit(msg)
        if why is not None:
            self.rejected += 1
            return why
        if self._add(msg, own=False) and self.waiting:
            self.waiting = False
            self._start_round(self.state.round, now)
        self._process(now)
        return None

    def tick(self, now: float) -> None:
        """Fire the timeouts that are due, and re-send when it is time."""
        due = [t for t in self._timers if t[0] <= now]
        self._timers = [t for t in self._timers if t[0] > now]
        for _, kind, round_ in sorted(due):
            self._on_timeout(kind, round_, now)
        if now >= self._next_resend:
            self._next_resend = now + self.timeouts.resend_s
            self._out.messages.extend(self._resend())
        self._process(now)

    def next_deadline(self) -> float:
        """When `tick` next has something to do."""
        return min([self._next_resend] + [t[0] for t in self._timers])

    def ready(self) -> Ready:
        """Take what the inputs so far produced. Persist `persist` before sending `messages`;
        it is set whenever this validator signed something new (its round, lock and valid
        block go with it; losing only those to a crash costs liveness, never safety)."""
        out, self._out = self._out, Ready()
        if self._dirty:
            out.persist = self.state
            self._dirty = False
        return out

    # --- admission ----------------------------------------------------------------------------

    def _admit(self, msg: Message) -> str | None:
        if msg.chain_id != self.chain_id or msg.height != self.height:
            return "not for this chain and height"
        if isinstance(msg, Proposal):
            if msg.proposer != self.validators.proposer(msg.height, msg.round):
                return f"not the proposer of round {msg.round}"
            if not verify(NodeId(msg.proposer), msg.signed_bytes(), msg.signature):
                return "proposal with a bad signature"
            return None
        if msg.validator not in self.validators:
            return "vote from a non-validator"
        if not verify(NodeId(msg.validator), msg.signed_bytes(), msg.signature):
            return "vote with a bad signature"
        return None

    def _add(self, msg: Message, own: bool) -> bool:
        """Record an admitted message; False if it changed nothing (a duplicate or too far)."""
        sender = msg.proposer if isinstance(msg, Proposal) else msg.validator
        if msg.round > self.highest_round.get(sender, -1):
            self.highest_round[sender] = msg.round
        if msg.round > self.state.round + FUTURE_ROUNDS:
            return True  # counted for line 55 only; it will be re-sent once we are nearer
        if isinstance(msg, Proposal):
            held_props = self.proposals.setdefault(msg.round, [])
            if len(held_props) >= MAX_PROPOSALS_PER_ROUND or any(
                    p.block.block_id == msg.block.block_id for p in held_props):
                return False
            held_props.append(msg)
            return True
        held = self.votes.setdefault((msg.kind, msg.round), {}).setdefault(msg.validator, {})
        if msg.block_id in held:
            return False
        if held:
            self._out.evidence.append(Equivocation(next(iter(held.values())), msg))
            if len(held) >= MAX_VOTES_PER_SLOT:
                return False
        held[msg.block_id] = msg
        return True

    # --- the algorithm ------------------------------------------------------------------------

    def _power(self, kind: int, round_: int, block_id: bytes | None = None) -> int:
        """Power of the (kind, round) votes for `block_id`, or of all of them when None."""
        box = self.votes.get((kind, round_), {})
        return sum(self.validators.power(v) for v, held in box.items()
                   if block_id is None or block_id in held)

    def _quorum(self, kind: int, round_: int, block_id: bytes | None = None) -> bool:
        return self.validators.has_quorum(self._power(kind, round_, block_id))

    def _valid_block(self, block: Block) -> bool:
        bid = block.block_id
        if bid not in self._valid:
            self._valid[bid] = self._check_block(block)
        return self._valid[bid] is None

    def _start_round(self, round_: int, now: float) -> None:
        s = self.state
        s.round, s.step = round_, PROPOSE
        if self.waiting:
            return
        if self.key is not None and self.validators.proposer(self.height, round_) == self.key.node_id.key:
            if ("proposal", round_) not in s.sent:
                block = s.valid_block if s.valid_block is not None else \
                    self._make_block(self.height, round_)
                self._send(sign_proposal(self.key, self.height, round_, s.valid_round, block),
                           ("proposal", round_))
            if s.valid_round >= 0:  # show the polka that justifies re-proposing
                self._out.messages.extend(self._polka(s.valid_round))
        else:
            self._schedule("propose", round_, now + self.timeouts.propose(round_))

    def _resume_timers(self, now: float) -> None:
        s = self.state
        if s.step == PROPOSE:
            self._start_round(s.round, now)
        # Prevote and precommit timeouts are scheduled again by _process when their quorums hold.

    def _process(self, now: float) -> None:
        """Apply the algorithm's "upon" rules until none fires."""
        while self.decision is None and self._step_once(now):
            pass
        self.check_invariants()

    def _step_once(self, now: float) -> bool:
        s = self.state
        # Line 49: a decision, in any round.
        for r, prop in [(r, p) for r in sorted(self.proposals) for p in self.proposals[r]]:
            bid = prop.block.block_id
            if self._quorum(PRECOMMIT, r, bid) and self._valid_block(prop.block):
                votes = self._votes_for(PRECOMMIT, r, bid)
                self.decision = (prop.block, CommitCertificate.from_votes(votes))
                self._out.decided = self.decision
                # Others may lack a precommit we counted (an equivocator's): show them all.
                self._out.messages.extend(v for v in votes if not self._mine(v))
                return False
        # Line 55: f+1 of the stake is in a later round: go there.
        target = self._skip_round()
        if target is not None:
            self._start_round(target, now)
            return True
        props = self.proposals.get(s.round, [])
        prop = props[0] if props else None
        if s.step == PROPOSE and prop is not None and not self.waiting:
            block, vr = prop.block, prop.valid_round
            if vr == -1:  # line 22
                good = self._valid_block(block) and (
                    s.locked_round == -1 or s.locked_block == block)
                self._prevote(block.block_id if good else NIL)
                return True
            if 0 <= vr < s.round and self._quorum(PREVOTE, vr, block.block_id):  # line 28
                good = self._valid_block(block) and (
                    s.locked_round <= vr or s.locked_block == block)
                self._prevote(block.block_id if good else NIL)
                return True
        if s.step == PREVOTE_STEP and ("prevote-timer", s.round) not in self._fired \
                and self._quorum(PREVOTE, s.round):  # line 34
            self._fired.add(("prevote-timer", s.round))
            self._schedule("prevote", s.round, now + self.timeouts.prevote(s.round))
        polka = next((p for p in props if self._quorum(PREVOTE, s.round, p.block.block_id)), None)
        if polka is not None and s.step >= PREVOTE_STEP and ("polka", s.round) not in self._fired \
                and self._valid_block(polka.block):  # line 36
            prop = polka
            self._fired.add(("polka", s.round))
            # Relay the polka once: a validator that missed a vote in it can still lock.
            self._out.messages.extend(
                v for v in self._votes_for(PREVOTE, s.round, prop.block.block_id)
                if not self._mine(v))
            if s.step == PREVOTE_STEP:
                s.locked_round, s.locked_block = s.round, prop.block
                self._precommit(prop.block.block_id)
            s.valid_round, s.valid_block = s.round, prop.block
            return True
        if s.step == PREVOTE_STEP and self._quorum(PREVOTE, s.round, NIL):  # line 44
            self._precommit(NIL)
            return True
        if ("precommit-timer", s.round) not in self._fired \
                and self._quorum(PRECOMMIT, s.round):  # line 47
            self._fired.add(("precommit-timer", s.round))
            self._schedule("precommit", s.round, now + self.timeouts.precommit(s.round))
        return False

    def _skip_round(self) -> int | None:
        """The highest round above ours that validators with more than 1/3 of the stake have
        reached (each counted at its highest round seen), if any."""
        ahead = sorted(((r, v) for v, r in self.highest_round.items() if r > self.state.round),
                       reverse=True)
        power = 0
        for r, v in ahead:
            power += self.validators.power(v)
            if self.validators.exceeds_third(power):
                return r
        return None

    def _on_timeout(self, kind: str, round_: int, now: float) -> None:
        s = self.state
        if round_ != s.round:
            return
        if kind == "propose" and s.step == PROPOSE:  # line 57
            self._prevote(NIL)
        elif kind == "prevote" and s.step == PREVOTE_STEP:  # line 61
            self._precommit(NIL)
        elif kind == "precommit":  # line 65
            self._start_round(round_ + 1, now)

    def _prevote(self, block_id: bytes) -> None:
        self._vote(PREVOTE, block_id)
        self.state.step = PREVOTE_STEP

    def _precommit(self, block_id: bytes) -> None:
        self._vote(PRECOMMIT, block_id)
        self.state.step = PRECOMMIT_STEP

    def _vote(self, kind: int, block_id: bytes) -> None:
        if self.key is None:
            return  # a follower runs the rules but signs nothing
        slot = ("prevote" if kind == PREVOTE else "precommit", self.state.round)
        if slot in self.state.sent:
            return  # signed before a restart: never sign a different one
        self._send(sign_vote(self.key, self.chain_id, kind, self.height, self.state.round,
                             block_id), slot)

    def _send(self, msg: Message, slot: tuple[str, int]) -> None:
        self.state.sent[slot] = msg
        self._dirty = True
        self._add(msg, own=True)
        self._out.messages.append(msg)

    def _schedule(self, kind: str, round_: int, when: float) -> None:
        self._timers.append((when, kind, round_))

    def _polka(self, round_: int) -> list[Vote]:
        block = self.state.valid_block
        return [] if block is None else self._votes_for(PREVOTE, round_, block.block_id)

    def _votes_for(self, kind: int, round_: int, block_id: bytes) -> list[Vote]:
        box = self.votes.get((kind, round_), {})
        return [held[block_id] for held in box.values() if block_id in held]

    def _mine(self, vote: Vote) -> bool:
        return self.key is not None and vote.validator == self.key.node_id.key

    def _resend(self) -> list[Message]:
        s = self.state
        mine = [msg for (kind, r), msg in sorted(self.state.sent.items(), key=lambda i: i[0][1])
                if r >= s.round - RESEND_ROUNDS
                or (kind == "prevote" and isinstance(msg, Vote) and msg.block_id != NIL)]
        if ("proposal", s.round) in s.sent and s.valid_round >= 0:
            mine.extend(self._polka(s.valid_round))
        return mine[-MAX_RESEND:]

    # --- checks -------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise InvariantViolated if the state breaks a rule of the algorithm."""
        s = self.state
        if s.step not in STEP_NAMES:
            raise InvariantViolated(f"unknown step {s.step}")
        if not -1 <= s.locked_round <= s.round or not -1 <= s.valid_round <= s.round:
            raise InvariantViolated(f"lock/valid round beyond round {s.round}")
        if (s.locked_round == -1) != (s.locked_block is None) or \
                (s.valid_round == -1) != (s.valid_block is None):
            raise InvariantViolated("a lock or valid round without its block, or the reverse")
        if s.locked_block is not None and ("polka", s.locked_round) in self._fired and \
                not self._quorum(PREVOTE, s.locked_round, s.locked_block.block_id):
            raise InvariantViolated("locked without a polka")
        for (kind, r), msg in s.sent.items():
            if msg.round != r or msg.height != self.height:
                raise InvariantViolated(f"a signed {kind} filed under the wrong round")
        if len(self._timers) > 16 * (s.round + 2):
            raise InvariantViolated("timers pile up")
        if self.decision is not None:
            block, cert = self.decision
            if not self._quorum(PRECOMMIT, cert.round, block.block_id):
                raise InvariantViolated("decided without a quorum of precommits")

    def describe(self) -> dict[str, Any]:
        """Where this height stands, for status output."""
        s = self.state
        return {"height": self.height, "round": s.round, "step": STEP_NAMES[s.step],
                "waiting": self.waiting, "locked_round": s.locked_round,
                "proposals": len(self.proposals),
                "validator": self.key is not None}
