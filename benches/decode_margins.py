#!/usr/bin/env python3
"""How far each generated step is from the reference: for every chat case of a
parity fixture, greedy decoding with the top two log-probabilities per token,
and each step's margin (top 1 - top 2, a logit difference) against the
reference's `greedy_margins`, for as long as the tokens agree.

    benches/decode_margins.py [--service target/release/internvl-grpc] \
        [--fixture tests/fixtures/tiny-internvl] [--service-args "--cache-type-v f16"]

The parity tests check the last prompt position's top 5 and the greedy
tokens; this shows the generated steps' logits, which is where a KV cache
type's summation error shows (benches/README.md, "Against llama-server").
Needs grpcio and grpcio-tools (scripts/setup puts them in .venv/). Video
cases are skipped.
"""

import argparse
import json
import os
import tempfile
from types import SimpleNamespace

import peer


def messages(pb, case, fixture):
    out = []
    for m in case["messages"]:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        content = []
        for p in parts:
            if p["type"] == "text":
                content.append(pb.Content(text=p["text"]))
            elif p["type"] == "image":
                with open(os.path.join(fixture, "images", p["image"]), "rb") as f:
                    content.append(pb.Content(image=pb.Image(data=f.read())))
            else:
                return None
        out.append(pb.Message(role=m["role"], content=content))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--service", default=os.path.join(peer.ROOT, "target/release/internvl-grpc"))
    p.add_argument("--fixture", default=os.path.join(peer.ROOT, "tests/fixtures/tiny-internvl"))
    p.add_argument("--service-args", default="")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="decode-margins-")
    stubs = peer.make_stubs(work)
    ggufs = sorted(f for f in os.listdir(args.fixture) if f.endswith(".gguf"))
    mmproj = next(f for f in ggufs if f.startswith("mmproj"))
    model = next(f for f in ggufs if not f.startswith("mmproj"))

    a = SimpleNamespace(
        model=os.path.join(args.fixture, model), mmproj=os.path.join(args.fixture, mmproj),
        parallel=2, n_ctx=8192, threads=2, cache_dir=os.path.join(work, "cache"))
    server = peer.Service(args.service, a, peer.free_port(), stubs, args.service_args)
    pb = server.pb
    with open(os.path.join(args.fixture, "reference.json")) as f:
        reference = json.load(f)
    with open(os.path.join(work, "service.log"), "w") as log:
        process, _ = peer.start(server, log)
        try:
            print("| case (prompt positions) | steps on the reference's path | "
                  "last prompt position \\|Δ margin\\| | generated steps: max / mean \\|Δ margin\\| |")
            print("|---|---|---|---|")
            for case in reference["chat"]:
                msgs = messages(pb, case, args.fixture)
                if msgs is None:
                    continue
                want, margins = case["greedy_ids"], case["greedy_margins"]
                request = pb.GenerateRequest(
                    messages=msgs, max_new_tokens=len(want), ignore_eos=True,
                    sampling=pb.SamplingParams(temperature=0.0), top_logprobs=2)
                steps = []
                for r in server.stub.Generate(request, timeout=600):
                    if r.HasField("delta"):
                        steps += [(t.id, t.top[0].logprob - t.top[1].logprob) for t in r.delta.tokens]
                agree = 0
                while agree < min(len(steps), len(want)) and steps[agree][0] == want[agree]:
                    agree += 1
                first = f"{abs(steps[0][1] - margins[0]):.4f}" if agree else ""
                later = [abs(steps[i][1] - margins[i]) for i in range(1, agree)]
                spread = f"{max(later):.4f} / {sum(later) / len(later):.4f}" if later else ""
                print(f"| {case['id']} ({case['input_ids_len']}) | {agree}/{len(want)} | {first} | {spread} |",
                      flush=True)
        finally:
            server.close()
            peer.stop(process)


if __name__ == "__main__":
    main()
