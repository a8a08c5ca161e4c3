#!/usr/bin/env python3
"""This service against llama.cpp's llama-server: same GGUF pair, same prompts,
same threads, one server at a time (benches/README.md, "Against llama-server").

    benches/peer.py --model M.gguf --mmproj MMPROJ.gguf \
        --service target/release/internvl-grpc --llama-server PATH/llama-server \
        [--threads 2] [--runs 2] [--mixed-seconds 90] [--json out.json]

`benches/build_llama_server.sh DIR` builds the llama-server this compares with.
Needs grpcio and grpcio-tools (scripts/setup puts them in .venv/).

Each run starts llama-server, runs every workload, stops it, then does the same
with the service. Times are taken by the client: request sent to the first
streamed token (llama-server: the first chunk carrying a generated token) and
to the last. Ratios are "service advantage": llama-server time / service time,
service rate / llama-server rate; above 1 the service is ahead.
"""

import argparse
import base64
import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = (
    "river stone market window garden letter engine winter silver harbor "
    "forest candle mirror ladder orange pocket thunder village blanket "
    "compass violin meadow saddle lantern pepper canyon marble feather "
    "anchor basket cotton dragon falcon glacier hammer island jacket kettle "
    "lemon magnet needle oyster parrot quartz rocket tunnel umbrella velvet "
    "walnut yogurt zipper bridge castle desert empire fabric gravel helmet"
).split()


# ---------------------------------------------------------------- inputs


def text_of(seed, words):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def png(width, height, seed):
    """An RGB PNG of smooth colour bands plus noise (a fresh image per seed)."""
    rng = random.Random(seed)
    a, b, c = (rng.randrange(256) for _ in range(3))
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            n = rng.randrange(32)
            row += bytes(((a + x + n) & 255, (b + y + n) & 255, (c + x + y) & 255))
        rows.append(bytes(row))

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 6))
        + chunk(b"IEND", b"")
    )


# A chat is a list of (role, text, image bytes or None).


# ---------------------------------------------------------------- clients


class Reply:
    def __init__(self):
        self.sent = time.monotonic()
        self.first = None
        self.last = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.text = ""
        # The service's own Done.timings split (ms); llama-server has none.
        self.server_ms = None

    def token(self, n=1):
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += n

    @property
    def ttft(self):
        return self.first - self.sent

    @property
    def total(self):
        return self.last - self.sent

    def decode_rate(self):
        return (self.tokens - 1) / (self.last - self.first)


class LlamaServer:
    name = "llama-server"

    def __init__(self, binary, args, port):
        self.binary, self.args, self.port = binary, args, port

    def command(self):
        a = self.args
        return [
            self.binary, "-m", a.model, "--mmproj", a.mmproj, "-np", str(a.parallel),
            "-c", str(a.n_ctx), "-t", str(a.threads), "--host", "127.0.0.1",
            "--port", str(self.port), "--no-webui",
        ]

    def ready(self):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def chat(self, chat, max_tokens):
        messages = []
        for role, text, image in chat:
            if image is None:
                messages.append({"role": role, "content": text})
                continue
            url = "data:image/png;base64," + base64.b64encode(image).decode()
            messages.append({
                "role": role,
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": text},
                ],
            })
        body = json.dumps({
            "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "timings_per_token": True,
            "cache_prompt": True, "stream_options": {"include_usage": True},
        })
        reply = Reply()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server: {response.status} {response.read()[:300]!r}")
        seen = 0
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            # Tokens generated so far; a token held back as incomplete UTF-8
            # arrives with the next one.
            n = (event.get("timings") or {}).get("predicted_n", 0)
            if n > seen:
                reply.token(n - seen)
                seen = n
            for choice in event.get("choices", []):
                reply.text += (choice.get("delta") or {}).get("content") or ""
            if event.get("usage"):
                reply.prompt_tokens = event["usage"]["prompt_tokens"]
        conn.close()
        return reply


class Service:
    name = "service"

    def __init__(self, binary, args, port, stubs):
        self.binary, self.args, self.port = binary, args, port
        sys.path.insert(0, stubs)
        import grpc
        from internvl.v1 import internvl_pb2, internvl_pb2_grpc

        self.grpc, self.pb = grpc, internvl_pb2
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = internvl_pb2_grpc.InternVLStub(self.channel)

    def command(self):
        a = self.args
        return [
            self.binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--model", a.model,
            "--mmproj", a.mmproj, "--parallel", str(a.parallel), "--n-ctx", str(a.n_ctx),
            "--threads", str(a.threads), "--cache-dir", self.args.cache_dir,
        ] + a.service_args.split()

    def ready(self):
        try:
            self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=2)
            return True
        except self.grpc.RpcError:
            return False

    def chat(self, chat, max_tokens):
        pb = self.pb
        messages = []
        for role, text, image in chat:
            content = []
            if image is not None:
                content.append(pb.Content(image=pb.Image(data=image)))
            content.append(pb.Content(text=text))
            messages.append(pb.Message(role=role, content=content))
        request = pb.GenerateRequest(
            messages=messages, max_new_tokens=max_tokens, ignore_eos=True,
            sampling=pb.SamplingParams(temperature=0.0),
        )
        reply = Reply()
        for response in self.stub.Generate(request, timeout=600):
            if response.HasField("delta"):
                if response.delta.tokens:
                    reply.token(len(response.delta.tokens))
                reply.text += response.delta.text
            elif response.HasField("done"):
                reply.prompt_tokens = response.done.usage.prompt_tokens
                t = response.done.timings
                reply.server_ms = {"queue": t.queue_ms, "vision": t.vision_ms, "prefill": t.prefill_ms}
        return reply

    def close(self):
        self.channel.close()


# ---------------------------------------------------------------- process


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """Largest VmRSS seen while it runs, every 50 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:
                return
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        self.join()
        return self.peak


def start(server, log):
    process = subprocess.Popen(server.command(), stdout=log, stderr=subprocess.STDOUT)
    began = time.monotonic()
    while not server.ready():
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {process.returncode}; see {log.name}")
        if time.monotonic() - began > 300:
            raise RuntimeError(f"{server.name} not ready after 300 s")
        time.sleep(0.1)
    return process, time.monotonic() - began


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- workloads


def concurrently(calls):
    results = [None] * len(calls)
    errors = []

    def run(i, call):
        try:
            results[i] = call()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def workloads(server, pid, args, run):
    out = {}
    chosen = args.workloads.split(",")
    # Single stream: the prompt once to warm the cache, then timed.
    prompt = [("user", text_of(1000, 40), None)]
    server.chat(prompt, 4)
    out["idle_rss_mib"] = rss_mib(pid)
    if "decode" in chosen:
        r = server.chat(prompt, args.decode_tokens)
        out["decode_tok_s"] = r.decode_rate()
        r = server.chat([("user", text_of(run * 100 + 99, 90), None)], 4)
        out["cold_ttft_s"] = r.ttft
    if "burst" in chosen:
        burst(server, pid, args, run, out)
    if "image" in chosen:
        image(server, run, out)
    if "mixed" in chosen:
        mixed(server, args, run, out)
    out["peak_rss_mib"] = rss_mib(pid, "VmHWM")
    return out


def burst(server, pid, args, run, out):
    """8 cold ~300-token prompts at once, 32 new tokens each."""
    sampler = Sampler(pid)
    sampler.start()
    began = time.monotonic()
    prompts = [[("user", text_of(run * 100 + i, 90), None)] for i in range(args.parallel)]
    replies = concurrently([lambda p=p: server.chat(p, 32) for p in prompts])
    out["burst_s"] = max(r.last for r in replies) - began
    out["burst_ttft_s"] = sum(r.ttft for r in replies) / len(replies)
    out["burst_prompt_tokens"] = sum(r.prompt_tokens for r in replies) / len(replies)
    out["burst_rss_mib"] = sampler.finish()


def image(server, run, out):
    """Three fresh 448x448 images one after another, each then again with
    another question; medians."""
    fresh, again = [], []
    for k in range(3):
        image = png(448, 448, seed=run * 7919 + k)
        r = server.chat([("user", "Describe this picture.", image)], 8)
        fresh.append(r.ttft)
        if r.server_ms:
            print(f"  service timings for a fresh image (ms): {r.server_ms}", flush=True)
        out["image_prompt_tokens"] = r.prompt_tokens
        r = server.chat([("user", "What colour dominates it?", image)], 8)
        again.append(r.ttft)
    out["image_ttft_s"] = sorted(fresh)[1]
    out["image_again_ttft_s"] = sorted(again)[1]


def mixed(server, args, run, out):
    """8 users, three-turn chats, each chat about one of three recurring
    images; completed requests per minute over a fixed time."""
    images = [png(448, 448, seed=run * 31 + k) for k in range(3)]
    done = [0] * args.parallel
    deadline = time.monotonic() + args.mixed_seconds

    def user(u):
        chat_no = 0
        while time.monotonic() < deadline:
            image = images[(u + chat_no) % len(images)]
            chat = []
            for turn in range(3):
                question = f"User {u}, question {turn}: " + text_of(u * 1000 + chat_no * 10 + turn, 12)
                chat.append(("user", question, image if turn == 0 else None))
                reply = server.chat(chat, 24)
                if time.monotonic() > deadline:
                    return
                done[u] += 1
                chat.append(("assistant", reply.text, None))
            chat_no += 1

    concurrently([lambda u=u: user(u) for u in range(args.parallel)])
    out["mixed_per_min"] = sum(done) * 60 / args.mixed_seconds


ROWS = [
    ("decode_tok_s", "single-stream decode, warm prompt (tok/s)", "rate"),
    ("cold_ttft_s", "one cold ~300-token prompt alone: time to first token (s)", "time"),
    ("burst_s", "8 cold ~300-token prompts at once, 32 tokens each: all done (s)", "time"),
    ("burst_ttft_s", "same burst: mean time to first token (s)", "time"),
    ("image_ttft_s", "a fresh 448x448 image: time to first token, median of 3 (s)", "time"),
    ("image_again_ttft_s", "the same image again, another question, median of 3 (s)", "time"),
    ("mixed_per_min", "8 users, multi-turn chats over 3 images (requests/min)", "rate"),
    ("idle_rss_mib", "RSS after load and one request (MiB)", "info"),
    ("burst_rss_mib", "largest RSS during the burst (MiB)", "info"),
    ("peak_rss_mib", "peak RSS, whole run (VmHWM, MiB)", "info"),
    ("burst_prompt_tokens", "burst prompt tokens per request", "info"),
    ("image_prompt_tokens", "image prompt tokens", "info"),
    ("load_s", "start until ready (s)", "info"),
]


def ratio(kind, peer, ours):
    if kind == "rate":
        return ours / peer
    if kind == "time":
        return peer / ours
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--mmproj", required=True)
    p.add_argument("--service", default=os.path.join(ROOT, "target/release/internvl-grpc"))
    p.add_argument("--llama-server", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--mixed-seconds", type=int, default=90)
    p.add_argument("--only", choices=["llama-server", "service"])
    p.add_argument("--workloads", default="decode,burst,image,mixed",
                   help="comma-separated subset of decode,burst,image,mixed")
    p.add_argument("--service-args", default="", help="extra flags for the service, space-separated")
    p.add_argument("--json")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="peer-bench-")
    args.cache_dir = os.path.join(work, "cache")
    stubs = os.path.join(work, "stubs")
    os.makedirs(stubs)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}/proto", f"--python_out={stubs}",
         f"--grpc_python_out={stubs}", "internvl/v1/internvl.proto"],
        check=True,
    )

    results = []
    for run in range(1, args.runs + 1):
        row = {}
        for kind in ("llama-server", "service"):
            if args.only and kind != args.only:
                continue
            port = free_port()
            server = (
                LlamaServer(args.llama_server, args, port)
                if kind == "llama-server"
                else Service(args.service, args, port, stubs)
            )
            with open(os.path.join(work, f"{kind}-{run}.log"), "w") as log:
                process, load_s = start(server, log)
                try:
                    figures = workloads(server, process.pid, args, run)
                finally:
                    if isinstance(server, Service):
                        server.close()
                    stop(process)
            figures["load_s"] = load_s
            row[kind] = figures
            print(f"run {run} {kind}: " + json.dumps({k: round(v, 3) for k, v in figures.items()}), flush=True)
        results.append(row)

    print(f"\nthreads {args.threads}, parallel {args.parallel}, n_ctx {args.n_ctx}; logs in {work}")
    header = "| workload | " + " | ".join(
        f"run {i} llama-server | run {i} service | run {i} ratio" for i in range(1, len(results) + 1)
    ) + " |"
    print(header)
    print("|---" * (1 + 3 * len(results)) + "|")
    for key, label, kind in ROWS:
        cells = []
        for row in results:
            peer, ours = row.get("llama-server", {}).get(key), row.get("service", {}).get(key)
            r = ratio(kind, peer, ours) if peer and ours else None
            cells += [
                "" if peer is None else f"{peer:.2f}",
                "" if ours is None else f"{ours:.2f}",
                "" if r is None else f"{r:.2f}",
            ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
