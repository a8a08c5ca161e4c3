#!/usr/bin/env python3
"""This service against llama.cpp's llama-server: same GGUF pair, same prompts,
same threads, one server at a time (benches/README.md, "Against llama-server").

    benches/peer.py --model M.gguf --mmproj MMPROJ.gguf \
        --service target/release/internvl-grpc --llama-server PATH/llama-server \
        [--llama-server-args "-kvu" --llama-server-args "-ub 1024" ...] \
        [--threads 2] [--runs 5] [--mixed-chats 5] [--json out.json]

`benches/build_llama_server.sh DIR` builds the llama-server this compares with.
Needs grpcio and grpcio-tools (scripts/setup puts them in .venv/).

Each run starts every contender in turn (llama-server once per flag set, then
the service; the order rotates from run to run), warms it with a text prompt
and an image, runs every workload, and stops it. Times are taken by the
client: request sent to the first streamed token (llama-server: the first
chunk carrying a generated token) and to the last.

For each row the table gives every contender's median and range over the
runs, then the service's ratio against the llama-server flag set with the best
median on that row ("service advantage": llama-server time / service time,
service rate / llama-server rate), per run, as median and range. A row counts
as ahead only when the whole range is above 1.0, behind when it is below,
otherwise a tie. Replies must have exactly the tokens asked for (greedy,
`ignore_eos`), and both servers' prompt token counts are compared.
"""

import argparse
import base64
import http.client
import glob
import json
import os
import random
import re
import signal
import socket
import statistics
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


def ggml_version(cmake_lists):
    """ggml's version as its CMakeLists.txt sets it."""
    with open(cmake_lists) as f:
        v = dict(re.findall(r"set\(GGML_VERSION_(MAJOR|MINOR|PATCH) (\d+)\)", f.read()))
    return f"{v.get('MAJOR')}.{v.get('MINOR')}.{v.get('PATCH')}"


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
    def __init__(self, binary, args, port, flags):
        self.binary, self.args, self.port, self.flags = binary, args, port, flags
        self.name = contender_name("llama-server", flags)

    def command(self):
        a = self.args
        return [
            self.binary, "-m", a.model, "--mmproj", a.mmproj, "-np", str(a.parallel),
            "-c", str(a.n_ctx), "-t", str(a.threads), "--host", "127.0.0.1",
            "--port", str(self.port), "--no-webui",
        ] + self.flags.split()

    def version(self, log_path):
        """`--version`, the ggml version and CPU flags of the tree it was
        built in (benches/build_llama_server.sh's layout), and its KV layout
        as its log reports it."""
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        info = " ".join((out.stdout + out.stderr).split())
        build = os.path.dirname(os.path.dirname(os.path.realpath(self.binary)))
        try:
            info += " | ggml " + ggml_version(os.path.join(os.path.dirname(build), "ggml", "CMakeLists.txt"))
            with open(os.path.join(build, "CMakeCache.txt")) as f:
                flags = re.findall(r"^(CMAKE_BUILD_TYPE|GGML_NATIVE|GGML_OPENMP|GGML_AVX\w*|GGML_BACKEND_DL|GGML_CPU_ALL_VARIANTS):\w+=(\S*)$",
                                   f.read(), re.M)
            info += " | " + " ".join(f"{k}={v}" for k, v in flags)
        except OSError:
            info += " | build tree not found"
        with open(log_path) as f:
            for line in f:
                if "kv_unified" in line:
                    info += " | " + line.split("load_model: ")[-1].strip()
                    break
        return info

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
    def __init__(self, binary, args, port, stubs, flags):
        self.binary, self.args, self.port, self.flags = binary, args, port, flags
        self.name = contender_name("service", flags)
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
        ] + self.flags.split()

    def version(self, _log_path):
        """`--version`, the llama.cpp it links (Cargo.lock's llama-cpp-sys-2
        and that crate's ggml version) and the CPU kernels it chose."""
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        info = " ".join(out.stdout.split())
        with open(os.path.join(ROOT, "Cargo.lock")) as f:
            lock = f.read()
        m = re.search(r'name = "llama-cpp-sys-2"\nversion = "([^"]+)"', lock)
        if m:
            info += f" | llama-cpp-sys-2 {m.group(1)}"
            sources = glob.glob(os.path.expanduser(
                f"~/.cargo/registry/src/*/llama-cpp-sys-2-{m.group(1)}/llama.cpp/ggml/CMakeLists.txt"))
            if sources:
                info += f" (ggml {ggml_version(sources[0])})"
        model_info = self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=10)
        return info + " | cpu_kernels: " + model_info.cpu_kernels

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


def make_stubs(work):
    """The service's Python stubs, generated from the proto into `work/stubs`."""
    stubs = os.path.join(work, "stubs")
    os.makedirs(stubs)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}/proto", f"--python_out={stubs}",
         f"--grpc_python_out={stubs}", "internvl/v1/internvl.proto"],
        check=True,
    )
    return stubs


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


def contender_name(kind, flags):
    return f"{kind} {flags}".strip() if flags else kind


class Mismatch(Exception):
    pass


def check_tokens(replies, wanted, what):
    """Greedy with `ignore_eos`: every reply has exactly the tokens asked for,
    or the comparison is not like for like."""
    got = sorted({r.tokens for r in replies})
    if got != [wanted]:
        raise Mismatch(f"{what}: replies of {got} tokens, asked for {wanted}")


def workloads(server, pid, args, run):
    out = {}
    chosen = args.workloads.split(",")
    # Warm-up: a text prompt (timed below, from the cache) and an image that
    # no workload uses, so that both servers have run every path once.
    prompt = [("user", text_of(1000, 40), None)]
    server.chat(prompt, 4)
    server.chat([("user", "Warm-up.", png(448, 448, seed=999_983))], 2)
    out["idle_rss_mib"] = rss_mib(pid)
    if "decode" in chosen:
        r = server.chat(prompt, args.decode_tokens)
        check_tokens([r], args.decode_tokens, "decode")
        out["decode_tok_s"] = r.decode_rate()
        r = server.chat([("user", text_of(run * 100 + 99, 90), None)], 4)
        out["cold_ttft_s"] = r.ttft
    if "burst" in chosen:
        burst(server, pid, args, run, out)
    if "image" in chosen:
        image(server, run, out)
    if "mixed" in chosen:
        mixed(server, args, run, out, own_images=False)
    if "mixed-own" in chosen:
        mixed(server, args, run, out, own_images=True)
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
    check_tokens(replies, 32, "burst")


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


MIXED_TURNS = 3
MIXED_TOKENS = 24


def mixed(server, args, run, out, own_images):
    """8 users, each through `--mixed-chats` three-turn chats (history resent
    with a fixed 20-word answer per turn, 24 tokens a reply), each chat about
    an image: one of 3 recurring images, or (`own_images`) a fresh image per
    chat. Ends when every user has finished: completed tokens per second, and
    the median time to first token of each turn."""
    key = "mixed_own" if own_images else "mixed"
    shared = [png(448, 448, seed=run * 31 + k) for k in range(3)]
    ttfts = [[] for _ in range(MIXED_TURNS)]
    replies = []

    def user(u):
        for chat_no in range(args.mixed_chats):
            image = (
                png(448, 448, seed=run * 100_003 + u * 101 + chat_no)
                if own_images
                else shared[(u + chat_no) % len(shared)]
            )
            chat = []
            for turn in range(MIXED_TURNS):
                question = f"User {u}, question {turn}: " + text_of(u * 1000 + chat_no * 10 + turn, 12)
                chat.append(("user", question, image if turn == 0 else None))
                reply = server.chat(chat, MIXED_TOKENS)
                replies.append(reply)
                ttfts[turn].append(reply.ttft)
                # Not the reply itself: the bench model's random tokens are
                # mostly padded-vocabulary ones whose text tokenizes again to
                # ~14 tokens each, so a resent reply would grow the history
                # by ~340 tokens a turn (past llama-server's 1,024 per slot).
                chat.append(("assistant", text_of(u * 7919 + chat_no * 10 + turn, 20), None))

    began = time.monotonic()
    concurrently([lambda u=u: user(u) for u in range(args.parallel)])
    wall = time.monotonic() - began
    check_tokens(replies, MIXED_TOKENS, key)
    out[f"{key}_tok_s"] = sum(r.tokens for r in replies) / wall
    out[f"{key}_s"] = wall
    for turn in range(MIXED_TURNS):
        out[f"{key}_ttft{turn + 1}_s"] = statistics.median(ttfts[turn])
    out[f"{key}_prompt_tokens"] = sum(r.prompt_tokens for r in replies) / len(replies)


MIXED_ROWS = []
for _key, _what in (("mixed", "over 3 recurring images"), ("mixed_own", "each chat its own image")):
    MIXED_ROWS += [
        (f"{_key}_tok_s", f"8 users, 3-turn chats {_what}: completed tokens/s", "rate"),
        (f"{_key}_ttft1_s", "  same: time to first token, turn 1 (median, s)", "time"),
        (f"{_key}_ttft2_s", "  same: turn 2", "time"),
        (f"{_key}_ttft3_s", "  same: turn 3", "time"),
        (f"{_key}_s", "  same: until every chat is done (s)", "info"),
        (f"{_key}_prompt_tokens", "  same: prompt tokens per request", "info"),
    ]

ROWS = [
    ("decode_tok_s", "single-stream decode, warm prompt (tok/s)", "rate"),
    ("cold_ttft_s", "one cold ~300-token prompt alone: time to first token (s)", "time"),
    ("burst_s", "8 cold ~300-token prompts at once, 32 tokens each: all done (s)", "time"),
    ("burst_ttft_s", "same burst: mean time to first token (s)", "time"),
    ("image_ttft_s", "a fresh 448x448 image: time to first token, median of 3 (s)", "time"),
    ("image_again_ttft_s", "the same image again, another question, median of 3 (s)", "time"),
] + MIXED_ROWS + [
    ("idle_rss_mib", "RSS after load and warm-up (MiB)", "info"),
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


def better(kind, a, b):
    """Whether median `a` is better than `b` for a row of this kind."""
    return a > b if kind == "rate" else a < b


def spread(values):
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def verdict(ratios):
    if min(ratios) > 1.0:
        return "ahead"
    if max(ratios) < 1.0:
        return "behind"
    return "tie"


def report(results, names):
    """The table: each contender's median [range], the best llama-server
    flag set on the row, and the service's per-run ratios against it."""
    service = next((n for n in names if n.startswith("service")), None)
    peers = [n for n in names if n.startswith("llama-server")]
    lines = [
        "| workload | " + " | ".join(names) + " | best llama-server | ratio, median [range] | verdict |",
        "|---" * (len(names) + 4) + "|",
    ]
    summary = {}
    for key, label, kind in ROWS:
        series = {n: [r[n][key] for r in results if key in r.get(n, {})] for n in names}
        if not any(series.values()):
            continue
        cells = [spread(v) if v else "" for v in (series[n] for n in names)]
        best, ratio_cell, word = "", "", ""
        complete = [p for p in peers if len(series[p]) == len(results)]
        if kind != "info" and complete and service and len(series[service]) == len(results):
            best = complete[0]
            for p in complete[1:]:
                if better(kind, statistics.median(series[p]), statistics.median(series[best])):
                    best = p
            ratios = [ratio(kind, a, b) for a, b in zip(series[best], series[service])]
            ratio_cell, word = spread(ratios), verdict(ratios)
            summary[key] = {"best": best, "ratios": ratios, "verdict": word}
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best} | {ratio_cell} | {word} |")
    return "\n".join(lines), summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--mmproj", required=True)
    p.add_argument("--service", default=os.path.join(ROOT, "target/release/internvl-grpc"))
    p.add_argument("--llama-server", required=True)
    p.add_argument("--llama-server-args", action="append",
                   help="a flag set for llama-server, space-separated; repeat to try several "
                        "(each is its own contender; '' is its defaults). Default: only ''")
    p.add_argument("--service-args", action="append",
                   help="extra flags for the service, space-separated; repeat to try several "
                        "(the ratio column is the first's). Default: only ''")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--mixed-chats", type=int, default=5,
                   help="three-turn chats each of the 8 users finishes in the mixed workloads")
    p.add_argument("--only", choices=["llama-server", "service"])
    p.add_argument("--workloads", default="decode,burst,image,mixed,mixed-own",
                   help="comma-separated subset of decode,burst,image,mixed,mixed-own")
    p.add_argument("--json")
    args = p.parse_args()
    flag_sets = args.llama_server_args or [""]

    work = tempfile.mkdtemp(prefix="peer-bench-")
    args.cache_dir = os.path.join(work, "cache")
    stubs = make_stubs(work)

    contenders = [("llama-server", f) for f in flag_sets] + [
        ("service", f) for f in args.service_args or [""]]
    if args.only:
        contenders = [c for c in contenders if c[0] == args.only]
    names = [contender_name(kind, flags) for kind, flags in contenders]
    versions = {}
    results = []
    for run in range(1, args.runs + 1):
        row = {}
        # Rotated each run, so that no contender always goes first (drift
        # over a run's minutes falls on each in turn).
        shift = (run - 1) % len(contenders)
        for kind, flags in contenders[shift:] + contenders[:shift]:
            port = free_port()
            server = (
                LlamaServer(args.llama_server, args, port, flags)
                if kind == "llama-server"
                else Service(args.service, args, port, stubs, flags)
            )
            log_path = os.path.join(work, f"{server.name.replace(' ', '_')}-{run}.log")
            with open(log_path, "w") as log:
                process, load_s = start(server, log)
                try:
                    if server.name not in versions:
                        versions[server.name] = server.version(log_path)
                    figures = workloads(server, process.pid, args, run)
                finally:
                    if isinstance(server, Service):
                        server.close()
                    stop(process)
            figures["load_s"] = load_s
            row[server.name] = figures
            print(f"run {run} {server.name}: " + json.dumps({k: round(v, 3) for k, v in figures.items()}), flush=True)
        results.append(row)

    print(f"\nthreads {args.threads}, parallel {args.parallel}, n_ctx {args.n_ctx}, "
          f"{args.runs} runs, mixed: {args.mixed_chats} chats per user; logs in {work}")
    for name, info in versions.items():
        print(f"- {name}: {info}")
    table, summary = report(results, names)
    print(table)
    for key, tokens in (("burst_prompt_tokens", "burst"), ("image_prompt_tokens", "image"),
                        ("mixed_prompt_tokens", "mixed"), ("mixed_own_prompt_tokens", "mixed, own images")):
        counts = {n: statistics.median([r[n][key] for r in results if key in r.get(n, {})])
                  for n in names if any(key in r.get(n, {}) for r in results)}
        if counts and max(counts.values()) - min(counts.values()) > 2:
            print(f"prompt tokens differ ({tokens}): {counts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": versions, "runs": results,
                       "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
