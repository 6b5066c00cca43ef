-- Shared by upload.lua and url.lua: counts answers by status class per thread, prints one JSON line at the end.
-- Every thread keeps its own counters (wrk runs one Lua state per thread); done() sums them.
threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

ok, shed, client_error, server_error = 0, 0, 0, 0

function response(status, headers, body)
   if status < 300 then ok = ok + 1
   elseif status == 429 or status == 503 then shed = shed + 1
   elseif status < 500 then client_error = client_error + 1
   else server_error = server_error + 1 end
end

function read_lines(path)
   local lines = {}
   for line in io.lines(path) do
      if line ~= "" then lines[#lines + 1] = line end
   end
   return lines
end

function done(summary, latency, requests)
   local totals = {ok = 0, shed = 0, client_error = 0, server_error = 0}
   for _, thread in ipairs(threads) do
      for key, _ in pairs(totals) do totals[key] = totals[key] + thread:get(key) end
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "ok": %d, "shed": %d, "client_error": %d, ' ..
      '"server_error": %d, "socket_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, ' ..
      '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, totals.ok, totals.shed, totals.client_error, totals.server_error,
      e.connect + e.read + e.write, e.timeout, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, latency.mean))
end
