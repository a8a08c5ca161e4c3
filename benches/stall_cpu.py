#!/usr/bin/env python3
"""CPU the server burns while its engine has nothing it can do.

Starts BINARY serving the tiny InternVL3 fixture (2 threads, one event
buffered per stream), then measures the process's CPU time (utime + stime
from /proc) over SECONDS in two states:
- idle: no request at all;
- stalled: one Generate stream whose client read its first event and then
  stops reading, so (once a small HTTP/2 window is full) its slot is held by
  the client and the engine thread has nothing to do until the client reads.
Prints one JSON line per state: CPU seconds per wall second.

    .venv/bin/python benches/stall_cpu.py target/debug/internvl-grpc [SECONDS]
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests/fixtures/tiny-internvl")


def stubs():
    out = tempfile.mkdtemp(prefix="internvl-stall-")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
         f"--python_out={out}", f"--grpc_python_out={out}",
         os.path.join(ROOT, "proto/internvl/v1/internvl.proto")],
        check=True)
    sys.path.insert(0, out)


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid, seconds):
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - t0)


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    stubs()
    import grpc
    from internvl.v1 import internvl_pb2 as pb, internvl_pb2_grpc as rpc

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, INTERNVL_STREAM_BUFFER="1")
    server = subprocess.Popen(
        [binary, "serve", "--model", os.path.join(FIXTURE, "tiny-internvl3-f32.gguf"),
         "--mmproj", os.path.join(FIXTURE, "mmproj-tiny-internvl3-f32.gguf"),
         "--listen", f"127.0.0.1:{port}", "--threads", "2",
         "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--cache-dir", tempfile.mkdtemp(prefix="internvl-stall-cache-")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A small HTTP/2 window without BDP probing: grpcio stops taking the
        # stream's messages off the socket soon after the client stops
        # reading, so the server's stream buffer fills and its slot waits.
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
        client = rpc.InternVLStub(channel)
        for _ in range(600):
            try:
                client.GetModelInfo(pb.GetModelInfoRequest(), timeout=1)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        time.sleep(1)
        print(json.dumps({"state": "idle", "cpu_per_s": round(measure(server.pid, seconds), 4)}))
        request = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=[pb.Content(text="count on")])],
            max_new_tokens=8000, ignore_eos=True, top_logprobs=20)
        stream = client.Generate(request)
        next(stream)
        # Held by its client in 20 scrapes running: a stall, not the moment
        # between two tokens.
        held = 'internvl_slots{phase="held_by_client"} 1'
        running = 0
        for _ in range(600):
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
            running = running + 1 if held in text else 0
            if running == 20:
                break
            time.sleep(0.05)
        else:
            sys.exit("the stream never stalled")
        print(json.dumps({"state": "stalled", "cpu_per_s": round(measure(server.pid, seconds), 4)}))
        stream.cancel()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
