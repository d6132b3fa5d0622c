-- wrk: POST a small completion request.
wrk.method = "POST"
wrk.body = '{"model":"bench","prompt":"hello","max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
