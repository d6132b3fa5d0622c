-- wrk: POST a one-token chat completion with a tenant key (the global gateway's auth stance
-- needs one; sims and nginx ignore it). MODEL (env) names the model, default bench.
local model = os.getenv("MODEL") or "bench"
wrk.method = "POST"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"hello"}],"max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
