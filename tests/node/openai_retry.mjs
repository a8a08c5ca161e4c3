// OpenAI's npm SDK retrying a 429 on its own (as tests/python/openai_retry.py).
// Usage: node openai_retry.mjs BASE_URL
// Against a server with one slot and a queue of one: two long requests take
// the slot and the queue place, then a third, from a client allowed to retry,
// meets a full queue (429 with retry-after-ms) and is answered once a place
// frees. Prints the third reply's summary as JSON.
import OpenAI from 'openai';

const [baseURL] = process.argv.slice(2);
const plain = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 120000 });
const MODEL = (await plain.models.list()).data[0].id;
const long = () => plain.chat.completions.create({
  model: MODEL,
  messages: [{ role: 'user', content: 'Count to a thousand.' }],
  max_tokens: 8000,
  ignore_eos: true,
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const holders = [long()];
await sleep(300);
holders.push(long());
await sleep(300);
// The SDK paces its tries by the server's retry-after-ms, so the hint must
// cover the slot holder's rest (as tests/python/openai_retry.py says).
const patient = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 8, timeout: 120000 });
const started = Date.now();
const third = await patient.chat.completions.create({
  model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 4,
});
const waited = (Date.now() - started) / 1000;
await Promise.all(holders);
console.log(JSON.stringify({ third: { finish_reason: third.choices[0].finish_reason, waited_s: waited } }));
