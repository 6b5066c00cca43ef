-- wrk -s url.lua URL -- URL_LIST [PATH]: POST {"image_url": ...} for each URL in URL_LIST in turn
-- (the images are served by a static host on loopback), to PATH (default /classify).
package.path = debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua;" .. package.path
require "common"

local bodies, path, counter = {}, "/classify", 0

function init(args)
   path = args[2] or path
   for _, url in ipairs(read_lines(args[1])) do
      bodies[#bodies + 1] = '{"image_url": "' .. url .. '"}'
   end
   counter = id * 17
end

function request()
   counter = counter + 1
   return wrk.format("POST", path, {["Content-Type"] = "application/json"}, bodies[counter % #bodies + 1])
end
