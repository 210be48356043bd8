-- wrk script for `scripts/bench.sh http`: single-record JSON POSTs with device Basic auth.
-- The device credentials come from the environment (OUTPOST_BENCH_AUTH = "Basic ...").
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = os.getenv("OUTPOST_BENCH_AUTH")
wrk.body = os.getenv("OUTPOST_BENCH_BODY")
  or '{"temperature":21.5,"humidity":48.2,"battery":3.71,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'

-- Count anything but 201 Created as a failure in the summary.
local failures = 0
response = function(status, headers, body)
  if status ~= 201 then
    failures = failures + 1
  end
end

done = function(summary, latency, requests)
  io.write(string.format("non-201 responses: %d\n", summary.errors.status))
  io.write(string.format("latency p50 %.2f ms, p99 %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
