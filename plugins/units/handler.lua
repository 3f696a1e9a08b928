-- units: converts numeric fields of a JSON body to the units the applications expect, so a
-- fleet that mixes Fahrenheit and Celsius, psi and kPa lands in one unit. A field converts
-- from the unit the message names in the conversion's `unit_prop` application property, or
-- else from the conversion's `from`.
local factors = {
  -- to a base unit: value * scale + offset
  degC = { dim = "temperature", scale = 1, offset = 0 },
  degF = { dim = "temperature", scale = 5 / 9, offset = -32 * 5 / 9 },
  K    = { dim = "temperature", scale = 1, offset = -273.15 },
  kPa  = { dim = "pressure", scale = 1, offset = 0 },
  Pa   = { dim = "pressure", scale = 0.001, offset = 0 },
  psi  = { dim = "pressure", scale = 6.894757293168, offset = 0 },
  bar  = { dim = "pressure", scale = 100, offset = 0 },
  m    = { dim = "length", scale = 1, offset = 0 },
  cm   = { dim = "length", scale = 0.01, offset = 0 },
  ft   = { dim = "length", scale = 0.3048, offset = 0 },
  ["in"] = { dim = "length", scale = 0.0254, offset = 0 },
  km   = { dim = "length", scale = 1000, offset = 0 },
  mi   = { dim = "length", scale = 1609.344, offset = 0 },
  kg   = { dim = "mass", scale = 1, offset = 0 },
  g    = { dim = "mass", scale = 0.001, offset = 0 },
  lb   = { dim = "mass", scale = 0.45359237, offset = 0 },
  ["m/s"]  = { dim = "speed", scale = 1, offset = 0 },
  ["km/h"] = { dim = "speed", scale = 1 / 3.6, offset = 0 },
  mph  = { dim = "speed", scale = 0.44704, offset = 0 },
}

local function convert(v, from, to)
  local a, b = factors[from], factors[to]
  local base = v * a.scale + a.offset
  return (base - b.offset) / b.scale
end

local function round(v, decimals)
  if decimals == nil then return v end
  local m = 10 ^ decimals
  return math.floor(v * m + 0.5) / m
end

return {
  init = function(conf)
    for i, c in ipairs(conf.conversions) do
      local at = "conversions[" .. i .. "]: "
      if type(c.path) ~= "string" then error(at .. "path is a string") end
      if factors[c.to] == nil then error(at .. "unknown unit " .. tostring(c.to)) end
      if c.from == nil and c.unit_prop == nil then error(at .. "needs from, unit_prop or both") end
      if c.from ~= nil then
        if factors[c.from] == nil then error(at .. "unknown unit " .. tostring(c.from)) end
        if factors[c.from].dim ~= factors[c.to].dim then
          error(at .. c.from .. " is not a " .. factors[c.to].dim)
        end
      end
    end
    return {}
  end,

  on_message = function(msg, device, conf, state)
    local body = msg:json()
    if body == nil then return nil end
    local changed = false
    for _, c in ipairs(conf.conversions) do
      local from = c.from
      if c.unit_prop ~= nil and msg.props[c.unit_prop] ~= nil then from = msg.props[c.unit_prop] end
      local v = hub.path_get(body, c.path)
      if type(v) == "number" and from ~= nil and factors[from] ~= nil
         and factors[from].dim == factors[c.to].dim and from ~= c.to then
        hub.path_set(body, c.path, round(convert(v, from, c.to), c.decimals or conf.decimals))
        if c.unit_prop ~= nil then msg.props[c.unit_prop] = c.to end
        changed = true
      end
    end
    if changed then msg:set_json(body) end
    return nil
  end,
}
