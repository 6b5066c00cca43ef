-- wrk -s upload.lua URL -- FILE_LIST [PATH]: POST a multipart upload of each JPEG in FILE_LIST in turn
-- (one file per request, field "image"), to PATH (default /classify).
package.path = debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua;" .. package.path
require "common"

local boundary = "rc-bench-4f1d9a7c"
local bodies, path, counter = {}, "/classify", 0

function init(args)
   path = args[2] or path
   for _, file in ipairs(read_lines(args[1])) do
      local handle = assert(io.open(file, "rb"))
      local data = handle:read("*a")
      handle:close()
      bodies[#bodies + 1] = "--" .. boundary .. "\r\n" ..
         'Content-Disposition: form-data; name="image"; filename="photo.jpg"\r\n' ..
         "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
   end
   counter = id * 17  -- threads start at different photos
end

function request()
   counter = counter + 1
   return wrk.format("POST", path, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary},
                     bodies[counter % #bodies + 1])
end
