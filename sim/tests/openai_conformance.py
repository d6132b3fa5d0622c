"""OpenAI Python SDK conformance against a running flotilla sim.

Usage: SIM_BASE_URL=http://127.0.0.1:PORT SIM_MODEL=demo python openai_conformance.py
The sim must run with --reject-unknown-fields (the unknown-field check expects a 400).
Prints one 'ok <check>' line per check; exits non-zero on the first failure.
"""
import os
import sys

import openai

base = os.environ["SIM_BASE_URL"].rstrip("/") + "/v1"
model = os.environ.get("SIM_MODEL", "demo")
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok {name}")


models = client.models.list()
check("models.list", any(m.id == model for m in models.data), [m.id for m in models.data])

c = client.completions.create(model=model, prompt="def fib(n):", max_tokens=7, extra_body={"ignore_eos": True})
check("completions.create", c.object == "text_completion" and len(c.choices) == 1, c)
check("completions usage", c.usage.completion_tokens == 7 and c.usage.prompt_tokens > 0
      and c.usage.total_tokens == c.usage.prompt_tokens + 7, c.usage)
check("completions finish_reason", c.choices[0].finish_reason == "length", c.choices[0])

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      seed=1, extra_body={"ignore_eos": True})
check("chat.completions.create", chat.object == "chat.completion" and chat.choices[0].message.role == "assistant", chat)
check("chat content", isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.content, chat)
check("chat usage", chat.usage.completion_tokens == 5, chat.usage)
again = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       seed=1, extra_body={"ignore_eos": True})
check("seeded determinism", again.choices[0].message.content == chat.choices[0].message.content)

stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "stream please"}],
                                        max_tokens=6, stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True})
pieces, usage, finish, roles = [], None, None, []
for chunk in stream:
    check_obj = chunk.object == "chat.completion.chunk"
    if not check_obj:
        check("chunk object", False, chunk)
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
check("stream role first", roles == ["assistant"], roles)
check("stream tokens", len(pieces) == 6, pieces)
check("stream finish_reason", finish == "length", finish)
check("stream usage chunk", usage is not None and usage.completion_tokens == 6, usage)

cs = client.completions.create(model=model, prompt="count:", max_tokens=4, stream=True,
                               extra_body={"ignore_eos": True})
texts = [ch.choices[0].text for ch in cs if ch.choices]
check("completion stream", "".join(texts) and len([t for t in texts if t]) == 4, texts)

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    check("unknown model raises NotFoundError", False, "no exception")
except openai.NotFoundError as e:
    check("unknown model raises NotFoundError", e.status_code == 404, e)

try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    check("negative max_tokens raises BadRequestError", False, "no exception")
except openai.BadRequestError as e:
    check("negative max_tokens raises BadRequestError", e.status_code == 400 and "max_tokens" in str(e), e)

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], extra_body={"bogus": 1})
    check("unknown field raises BadRequestError", False, "no exception")
except openai.BadRequestError as e:
    check("unknown field raises BadRequestError", e.status_code == 400, e)

try:
    client.completions.create(model=model, prompt="word " * 5000, max_tokens=1)
    check("over-long prompt raises APIStatusError 413", False, "no exception")
except openai.APIStatusError as e:
    check("over-long prompt raises APIStatusError 413", e.status_code == 413, e)

print("all openai sdk checks passed")
