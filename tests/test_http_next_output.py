"""The HTTP worker's wait for a request's next output (Api._next_unless_gone): an output goes on the
moment it exists, and a client that leaves is noticed while none does. Counted in event-loop turns,
not wall time."""
import asyncio

from light_tts.server.http.app import GONE, Api


class Client:
    """What _next_unless_gone asks of Starlette's Request: whether the client has left."""

    def __init__(self, gone: bool = False):
        self.gone = gone
        self.checks = 0

    async def is_disconnected(self) -> bool:
        self.checks += 1
        return self.gone


async def outputs(ready: asyncio.Event, item):
    await ready.wait()
    yield item


def test_an_output_is_handed_on_when_it_exists():
    async def main():
        ready, client = asyncio.Event(), Client()
        gen = outputs(ready, "chunk")
        task = asyncio.ensure_future(Api._next_unless_gone(client, gen))
        while client.checks < 2:          # the waiter has looked at its client twice: nothing yet
            await asyncio.sleep(0.01)
        assert not task.done()
        ready.set()
        for _ in range(20):               # a few turns of the loop, far below any check interval
            await asyncio.sleep(0)
            if task.done():
                break
        # a pause between the checks (the old loop) would still be sleeping here
        assert task.done(), "the output waited for the next disconnect check"
        assert task.result() == "chunk"
        await gen.aclose()
    asyncio.run(main())


def test_a_client_that_leaves_is_noticed_and_the_wait_cancelled():
    async def main():
        ready, client = asyncio.Event(), Client(gone=True)
        gen = outputs(ready, "chunk")
        assert await asyncio.wait_for(Api._next_unless_gone(client, gen), timeout=30) is GONE
        assert client.checks >= 1
        await gen.aclose()                # the pending step was cancelled: closing does not hang
    asyncio.run(main())
