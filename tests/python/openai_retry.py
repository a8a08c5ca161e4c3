"""OpenAI's Python SDK retrying a 429 on its own.

Usage: openai_retry.py BASE_URL
Against a server with one slot and a queue of one: two long requests take
the slot and the queue place, then a third, from a client allowed to retry,
meets a full queue (429 with Retry-After) and is answered once a place
frees. Prints the third reply's summary as JSON.
"""
import json
import sys
import threading
import time

import openai

base_url = sys.argv[1]
plain = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
MODEL = plain.models.list().data[0].id
LONG = dict(
    model=MODEL,
    messages=[{"role": "user", "content": "Count to a thousand."}],
    max_tokens=8000,
    extra_body={"ignore_eos": True},
)

holders = [threading.Thread(target=lambda: plain.chat.completions.create(**LONG)) for _ in range(2)]
for holder in holders:
    holder.start()
    time.sleep(0.3)

# The SDK paces its tries by the server's retry-after-ms, so the hint must
# cover the slot holder's rest (its 8000 tokens take seconds): with the old
# hints (50 ms) eight tries were spent before it ended. Eight, not the SDK's
# default two: the hint is the holder's pace so far, and on a machine whose
# load keeps changing (CI building beside the tests) that pace misleads.
patient = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=8, timeout=120)
started = time.monotonic()
third = patient.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
)
waited = time.monotonic() - started
for holder in holders:
    holder.join()
print(
    json.dumps(
        {
            "third": {
                "finish_reason": third.choices[0].finish_reason,
                "waited_s": waited,
            }
        }
    )
)
