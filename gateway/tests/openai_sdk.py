"""The official openai Python SDK against a flotilla gateway (GW_BASE_URL, GW_MODEL).
Prints one 'ok <check>' line per check; exits non-zero on the first failure.

The same script runs against sims (gateway/tests/openai_sdk.rs) and against a real vLLM
(realvllm/tests/real_vllm.rs), so it only asserts what both must do. Token counts come
from usage, not from counting text chunks: a real engine holds back a token that ends
inside a multi-byte UTF-8 character and sends it with the next one."""
import os
import sys

import openai

base = os.environ["GW_BASE_URL"].rstrip("/") + "/v1"
model = os.environ.get("GW_MODEL", "demo")
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok {name}")


models = client.models.list()
check("models.list", any(m.id == model for m in models.data), [m.id for m in models.data])

c = client.completions.create(model=model, prompt="def fib(n):", max_tokens=7, extra_body={"ignore_eos": True})
check("completions.create", c.object == "text_completion" and c.usage.completion_tokens == 7, c)

raw = client.completions.with_raw_response.create(model=model, prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
check("x-flotilla-endpoint header", raw.headers.get("x-flotilla-endpoint"), dict(raw.headers))

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      extra_body={"ignore_eos": True})
check("chat.completions.create", chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5, chat)

# stream with usage requested by the client: the usage chunk arrives
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "stream please"}],
                                        max_tokens=6, stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True})
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
check("stream tokens", 1 <= len(pieces) <= 6, pieces)
check("stream usage when asked", usage is not None and usage.completion_tokens == 6, usage)

# stream without usage: the gateway asks the engine for usage but strips that chunk
stream = client.completions.create(model=model, prompt="count", max_tokens=4, stream=True,
                                   extra_body={"ignore_eos": True})
chunks = list(stream)
check("stream no usage chunk", all(ch.usage is None for ch in chunks) and all(len(ch.choices) > 0 for ch in chunks),
      chunks)
check("stream text", 1 <= sum(1 for ch in chunks if ch.choices[0].text) <= 4, chunks)
check("stream finish", chunks[-1].choices[0].finish_reason == "length", chunks[-1])

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    check("unknown model", False, "no error")
except openai.NotFoundError as e:
    check("unknown model -> NotFoundError", e.status_code == 404 and "no-such-model" in str(e), e)

try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    check("bad request", False, "no error")
except openai.BadRequestError as e:
    check("bad request -> BadRequestError", e.status_code == 400 and "max_tokens" in str(e), e)

try:
    client.completions.create(model=model, prompt="x", max_tokens=1,
                              extra_headers={"x-flotilla-routing": "fastest"})
    check("bad routing header", False, "no error")
except openai.BadRequestError as e:
    check("bad routing header -> BadRequestError", "least-request" in str(e), e)

print("all openai sdk checks passed")
