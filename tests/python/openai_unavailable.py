"""OpenAI's Python SDK meeting a draining replica.

Usage: openai_unavailable.py BASE_URL
Asks once with the SDK's default retries (2): a draining server answers
503 each time, and the SDK, having retried, raises. Prints the error as JSON.
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", timeout=30)
try:
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    print(json.dumps({"error": None}))
except openai.APIStatusError as e:
    print(json.dumps({"status": e.status_code, "type": type(e).__name__, "body": e.body}))
