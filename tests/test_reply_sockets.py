"""ReplySockets: replies reach HTTP workers over real ipc sockets; a gone worker's socket is closed
when a new worker appears, and the number open stays bounded."""
import os

import zmq

from light_tts.server.io_struct import AbortReq, sock_recv
from light_tts.server.ipc import ReplySockets, bind_pull


def test_replies_and_pruning(tmp_path):
    ctx = zmq.Context()
    try:
        socks = ReplySockets(ctx)
        addr = lambda name: f"ipc://{tmp_path}/{name}.ipc"
        a = bind_pull(ctx, addr("a"))
        socks.send(addr("a"), AbortReq(rid="1"))
        assert a.poll(5000) and sock_recv(a).rid == "1"
        a.close(linger=0)                       # worker a goes away (its ipc file with it)
        if os.path.exists(f"{tmp_path}/a.ipc"):
            os.remove(f"{tmp_path}/a.ipc")
        socks.send(addr("a"), AbortReq(rid="lost"))   # queued for nobody
        b = bind_pull(ctx, addr("b"))
        socks.send(addr("b"), AbortReq(rid="2"))      # a new worker: a's socket is closed
        assert b.poll(5000) and sock_recv(b).rid == "2"
        assert len(socks) == 1
        socks.MAX_OPEN = 3
        pulls = [bind_pull(ctx, addr(f"w{i}")) for i in range(5)]
        for i in range(5):
            socks.send(addr(f"w{i}"), AbortReq(rid=f"w{i}"))
            assert pulls[i].poll(5000) and sock_recv(pulls[i]).rid == f"w{i}"
            assert len(socks) <= 3
        for p in pulls + [b]:
            p.close(linger=0)
        socks.close()
        assert len(socks) == 0
    finally:
        ctx.destroy(linger=0)
