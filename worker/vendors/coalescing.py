"""Batch-delete coalescing: the quarantine deletes of one ESET account that arrive within a
short window go out as one ``:batchDelete`` call.

ESET counts 10 calls/s per account, whatever a call carries, and one batch delete takes up
to :data:`~schemas.commands.MAX_OBJECTS_PER_BATCH` objects. Playbooks mostly delete one
object per command, so under the limit each command would wait for a call of its own.
Here the commands of one account join a *batch*: it stays open for ``window_s`` after its
first command, then while its call waits for the account's rate slot, and closes when the
call is about to go out; a command whose objects would overflow it (or, once its call is
under way, whose deadline is earlier than the call's) closes it and opens the next one.
The objects of the members are unioned, duplicates sent once.

Each command keeps its own idempotency claim, budget and result event:

- Right before the merged call goes out (after the rate slot), every member's
  ``marks.sending()`` (the handler's "mark sent") is asked. A member whose mark says no
  (its claim was lost) or fails is left out of the body and gets :class:`Withheld` or
  that failure.
- Every member gets the merged call's outcome: ESET answers ``200 {}`` for the whole batch,
  so each gets that reply (its event names its own objects); a failure (retries or
  deadline exhausted, 202 answer lost) is each member's failure. Each member's budget is
  charged the call's attempts, collects, statuses and vendor time, which its event reports.
- A merged call refused as invalid (400, never accepted with a 202) did nothing: its
  members are sent again one by one, so only the command ESET refuses fails.

The merged call's deadlines are the earliest of its members'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace
from enum import Enum

from worker.errors import PermanentFailure, Withheld
from worker.replies import VendorReply, VendorRequest
from worker.vendors.sender import GO_AHEAD, CallBudget, Marks, Send

log = logging.getLogger(__name__)


class _Alone(Enum):
    """A member's outcome when the merged call was refused as invalid: send it alone."""

    SEND = "send alone"


@dataclass(eq=False)
class _Member:
    object_uuids: list[str]
    budget: CallBudget
    marks: Marks
    outcome: asyncio.Future[VendorReply | _Alone]

    @property
    def waiting(self) -> bool:
        return not self.outcome.done()  # done early: cancelled, or refused at its mark


@dataclass(eq=False)
class _Batch:
    request: VendorRequest  # its first member's: the merged call's URL and route
    members: list[_Member] = field(default_factory=list)
    objects: dict[str, None] = field(default_factory=dict)  # the union, in arrival order
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    call: CallBudget | None = None  # the merged call's budget, once the call is under way
    sent: list[_Member] | None = None  # the members that went out, once settled
    body: list[str] = field(default_factory=list)  # the objectUuids sent, filled when settled

    def takes(self, member: _Member, max_objects: int) -> bool:
        """True when ``member`` fits: objects within the batch size, and, once the call is
        under way, no deadline earlier than the call's (its retries are already bounded)."""
        if len(self.objects.keys() | member.object_uuids) > max_objects:
            return False
        if self.call is None:
            return True
        return (
            member.budget.deadline >= self.call.deadline
            and member.budget.retry_until >= self.call.retry_until
        )

    def add(self, member: _Member) -> None:
        self.members.append(member)
        self.objects.update(dict.fromkeys(member.object_uuids))

    def waiting(self) -> list[_Member]:
        return [m for m in self.members if m.waiting]


class BatchDeleteCoalescer:
    """Wraps one ESET account's sender for batch deletes: merges those that arrive
    together; ``window_s`` 0 sends each alone."""

    def __init__(self, sender: Send, window_s: float, max_objects: int) -> None:
        self._sender = sender
        self._window_s = window_s
        self._max_objects = max_objects
        self._open: _Batch | None = None  # the batch new commands join
        self._calls: set[asyncio.Task[None]] = set()  # kept referenced while they run

    async def send(
        self, request: VendorRequest, budget: CallBudget, marks: Marks = GO_AHEAD
    ) -> VendorReply:
        """ESET's answer for the request's objects, sent alone or as part of a merged call."""
        object_uuids: list[str] = request.json["objectUuids"]
        if self._window_s <= 0 or len(set(object_uuids)) > self._max_objects:
            return await self._sender.send(request, budget, marks)
        member = _Member(object_uuids, budget, marks, asyncio.get_running_loop().create_future())
        self._join(member, request)
        outcome = await member.outcome  # cancelling this command cancels its membership
        if isinstance(outcome, VendorReply):
            return outcome
        # The merged call was refused as invalid, so nothing was done: this command's
        # objects go alone (its claim is already marked sent), and only what ESET refuses
        # on its own fails.
        return await self._sender.send(request, budget, marks)

    async def collect(
        self, request: VendorRequest, response_id: str, budget: CallBudget
    ) -> VendorReply:
        return await self._sender.collect(request, response_id, budget)

    def _join(self, member: _Member, request: VendorRequest) -> None:
        batch = self._open
        if batch is not None and not batch.takes(member, self._max_objects):
            self._close(batch)
            batch = None
        if batch is None:
            batch = self._open = _Batch(request)
            task = asyncio.create_task(self._run(batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        batch.add(member)
        if len(batch.objects) >= self._max_objects:
            self._close(batch)  # full: no need to wait for the window

    def _close(self, batch: _Batch) -> None:
        """No command joins ``batch`` any more; its window ends now."""
        batch.closed.set()
        if self._open is batch:
            self._open = None

    async def _run(self, batch: _Batch) -> None:
        """One batch's merged call, from the end of its window to every member's outcome."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._window_s):
                    await batch.closed.wait()
            waiting = batch.waiting()
            if not waiting:
                return
            batch.call = CallBudget(
                deadline=min(m.budget.deadline for m in waiting),
                retry_deadline=min(m.budget.retry_until for m in waiting),
            )
            merged = replace(batch.request, json={"objectUuids": batch.body})
            reply = await self._sender.send(merged, batch.call, _Settling(self, batch))
        except Withheld:
            return  # no member was left to send: each already has its outcome
        except BaseException as error:
            self._finish(batch, error)
            if not isinstance(error, Exception):
                raise
        else:
            self._finish(batch, reply)
        finally:
            self._close(batch)

    async def settle(self, batch: _Batch) -> bool:
        """Right before the merged call's body goes out: the batch closes, every member's
        own mark is asked, and the body becomes the objects of the members it allowed.
        False when none did."""
        self._close(batch)
        candidates = batch.waiting()
        marks = await asyncio.gather(
            *(m.marks.sending() for m in candidates), return_exceptions=True
        )
        batch.sent = []
        for member, mark in zip(candidates, marks, strict=True):
            if not member.waiting:
                continue  # cancelled while marking: nobody waits for its outcome
            if mark is True:
                batch.sent.append(member)
            elif isinstance(mark, BaseException):
                _deliver(member, mark)  # e.g. the store is away: it must not be sent
            else:
                _deliver(member, Withheld("its claim was lost before the merged call"))
        batch.body.extend(dict.fromkeys(u for m in batch.sent for u in m.object_uuids))
        if len(batch.sent) > 1:
            log.debug(
                "batch delete of %d commands, %d objects, in one call",
                len(batch.sent), len(batch.body),
            )
        return bool(batch.sent)

    def _finish(self, batch: _Batch, outcome: VendorReply | BaseException) -> None:
        # Members not settled yet (the call failed before anything went out, e.g. at the
        # token) share the failure: none of them was marked, so each may be retried.
        members = batch.sent if batch.sent is not None else batch.waiting()
        call = batch.call
        result: VendorReply | BaseException | _Alone = outcome
        if call is not None and len(members) > 1 and _refused_as_invalid(outcome, call):
            result = _Alone.SEND
        for member in members:
            if call is not None:
                _charge(member.budget, call)
            _deliver(member, result)


@dataclass(frozen=True)
class _Settling:
    """The merged call's marks: its members are settled when it is about to go out (once:
    a retry sends the same members); a merged request keeps no 202, as it can not be
    rebuilt from one command."""

    coalescer: BatchDeleteCoalescer
    batch: _Batch

    async def sending(self) -> bool:
        if self.batch.sent is None:
            return await self.coalescer.settle(self.batch)
        return bool(self.batch.sent)

    async def accepted(self, response_id: str) -> bool:
        return True


def _refused_as_invalid(outcome: VendorReply | BaseException, call: CallBudget) -> bool:
    """A 400 to the request itself: ESET did nothing. (A 400 to a collect of a 202'd
    request does not say that: the batch may have been done.)"""
    return (
        isinstance(outcome, PermanentFailure)
        and outcome.vendor_status == 400
        and 202 not in call.statuses
    )


def _charge(budget: CallBudget, call: CallBudget) -> None:
    """What the merged call cost, on a member's budget (its event reports it)."""
    budget.attempts += call.attempts
    budget.collects += call.collects
    budget.statuses.extend(call.statuses)
    budget.vendor_time_s += call.vendor_time_s


def _deliver(member: _Member, outcome: VendorReply | BaseException | _Alone) -> None:
    if not member.waiting:
        return
    if isinstance(outcome, asyncio.CancelledError):
        member.outcome.cancel()
    elif isinstance(outcome, BaseException):
        member.outcome.set_exception(outcome)
    else:
        member.outcome.set_result(outcome)

