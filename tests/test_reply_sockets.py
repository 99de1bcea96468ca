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


def test_a_killed_workers_socket_is_pruned_though_its_file_stays(tmp_path):
    """SIGKILL leaves the worker's ipc file behind: the pid in its tag tells that it is gone."""
    import subprocess
    import sys
    from light_tts.server.ipc import Endpoints, worker_alive, worker_tag
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    endpoints = Endpoints(root=str(tmp_path), encode_num=1, decode_num=1)
    gone = endpoints.http(f"{dead.pid:x}abcdef")
    live = endpoints.http(worker_tag())          # this process's tag
    ctx = zmq.Context()
    try:
        pulls = [bind_pull(ctx, gone), bind_pull(ctx, live)]    # both files exist
        assert not worker_alive(gone) and worker_alive(live)
        socks = ReplySockets(ctx)
        socks.send(gone, AbortReq(rid="1"))
        socks.send(live, AbortReq(rid="2"))     # a new address: the dead worker's socket goes
        assert len(socks) == 1
        for p in pulls:
            p.close(linger=0)
        socks.close()
    finally:
        ctx.destroy(linger=0)


def test_http_workers_bounded_by_the_open_reply_sockets(tmp_path):
    import pytest
    from light_tts.server.args import MAX_HTTP_WORKERS, parse_args
    assert ReplySockets.MAX_OPEN == MAX_HTTP_WORKERS
    assert parse_args(["--model_dir", str(tmp_path), "--httpserver_workers", str(MAX_HTTP_WORKERS)])
    with pytest.raises(SystemExit):
        parse_args(["--model_dir", str(tmp_path), "--httpserver_workers", str(MAX_HTTP_WORKERS + 1)])


def _start_in_child(client, conn):
    import asyncio

    async def run():
        await client.start()
        conn.send((os.getpid(), client.reply_addr, client.new_rid()))
        await client.stop()
    asyncio.run(run())


def test_workers_forked_from_one_client_get_their_own_reply_address(tmp_path):
    """gunicorn --preload builds the app, and its BackendClient, in the master and forks the
    workers from it: each must still bind a reply address of its own, or the last to bind gets
    every worker's replies and the others' requests hang."""
    import multiprocessing as mp
    from light_tts.server.http.manager import BackendClient
    from light_tts.server.ipc import Endpoints
    endpoints = Endpoints(root=str(tmp_path), encode_num=1, decode_num=1)
    endpoints.create()
    client = BackendClient(endpoints)            # in the "master"
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    workers = [ctx.Process(target=_start_in_child, args=(client, send)) for _ in range(2)]
    for w in workers:
        w.start()
    got = [recv.recv() for _ in workers]
    for w in workers:
        w.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    (pid_a, addr_a, rid_a), (pid_b, addr_b, rid_b) = got
    assert addr_a != addr_b and rid_a.split("-")[0] != rid_b.split("-")[0]
    assert f"http-{pid_a:x}" in addr_a and f"http-{pid_b:x}" in addr_b   # the tag names its own worker
