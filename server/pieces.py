"""What generation hands the endpoints: whole choices, or a stream's pieces of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from alignd.server.logprobs import TokenLogprob
from alignd.server.schemas import ChoiceAlignment


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Delta:
    """One streamed piece of one choice; the last one has a finish_reason (and alignment)."""

    index: int
    text: str
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None
    logprobs: list[TokenLogprob] | None = None
    offset: int = 0  # characters of the choice's text before this piece
    token_ids: list[int] = field(default_factory=list)  # blockwise's: whole choices are built from them


T = TypeVar("T")


async def merged(sources: list[AsyncIterator[T]],
                 interrupt: Callable[[], Awaitable[BaseException]] | None = None) -> AsyncIterator[T]:
    """The items of every source, interleaved as they come. A source's failure ends it with that
    exception, as does `interrupt()` if it returns first; either way the other sources are
    cancelled, which aborts their engine requests (a disconnected client lands here too)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await queue.put(item)
        except BaseException as e:  # hand failures to the consumer, which re-raises them
            await queue.put(e)
            raise
        finally:
            await queue.put(done)

    async def interrupter() -> None:
        assert interrupt is not None
        await queue.put(await interrupt())

    tasks = [asyncio.create_task(pump(source)) for source in sources]
    if interrupt is not None:
        tasks.append(asyncio.create_task(interrupter()))  # never puts `done`: not counted
    try:
        remaining = len(sources)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
