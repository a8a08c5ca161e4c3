"""Load generator for internvl.v1, run as its own process (grpc.aio).

Usage: load_client.py STUBS_DIR ADDRESS CONCURRENCY REQUESTS MAX_NEW_TOKENS TIME_LIMIT_S

CONCURRENCY workers each send Generate calls back to back (closed loop; a
refused call is not retried, but its worker waits the server's
grpc-retry-pushback-ms before its next call) until REQUESTS calls have been
sent or TIME_LIMIT_S has passed. Prints
a JSON summary: status counts, latency percentiles of the successful calls
(request sent to last message), and whether the run finished in time.
"""
import asyncio
import json
import sys
import time

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from internvl.v1 import internvl_pb2, internvl_pb2_grpc  # noqa: E402


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def main() -> None:
    address = sys.argv[2]
    concurrency, total, max_new, limit = (int(a) for a in sys.argv[3:7])
    codes = {}
    details = []
    latencies = []
    # How long each refused call took: "at once" means without waiting in
    # the queue for a slot.
    refusals = []
    tokens = 0
    sent = 0
    started = time.monotonic()
    deadline = started + limit

    async with grpc.aio.insecure_channel(address) as channel:
        stub = internvl_pb2_grpc.InternVLStub(channel)

        async def worker(worker_id: int) -> None:
            nonlocal sent, tokens
            while sent < total and time.monotonic() < deadline:
                n = sent
                sent += 1
                request = internvl_pb2.GenerateRequest(
                    messages=[
                        internvl_pb2.Message(
                            role="user",
                            content=[internvl_pb2.Content(text=f"Request {n}: tell me a story.")],
                        )
                    ],
                    sampling=internvl_pb2.SamplingParams(temperature=0.0),
                    max_new_tokens=max_new,
                    ignore_eos=True,
                    request_id=f"load-{worker_id}-{n}",
                )
                t = time.monotonic()
                code = "OK"
                got = 0
                try:
                    async for message in stub.Generate(request, timeout=limit):
                        if message.HasField("delta"):
                            got += len(message.delta.tokens)
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                    if len(details) < 3:
                        details.append(f"{code}: {e.details()}")
                    # A well-behaved client waits as long as the server asks.
                    pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    if pushback is not None:
                        await asyncio.sleep(int(pushback) / 1e3)
                codes[code] = codes.get(code, 0) + 1
                took = (time.monotonic() - t) * 1e3
                if code == "OK":
                    latencies.append(took)
                    tokens += got
                elif code == "RESOURCE_EXHAUSTED":
                    refusals.append(took)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))

    wall = time.monotonic() - started
    print(
        json.dumps(
            {
                "concurrency": concurrency,
                "sent": sent,
                "finished_in_time": sent >= total and wall < limit,
                "codes": codes,
                "first_errors": details,
                "p50_ms": percentile(latencies, 0.50),
                "p99_ms": percentile(latencies, 0.99),
                "refused_p50_ms": percentile(refusals, 0.50),
                "refused_p99_ms": percentile(refusals, 0.99),
                "tokens": tokens,
                "wall_s": wall,
            }
        )
    )


asyncio.run(main())
