-- json_schema: checks a JSON body against a schema (a subset of JSON Schema: type, properties,
-- required, additionalProperties = false, items, enum, minimum, maximum, minLength, maxLength,
-- minItems, maxItems) and drops, rejects or marks a message that does not conform.
local function kind(v)
  local t = type(v)
  if t == "number" then
    if math.type(v) == "integer" or v == math.floor(v) then return "integer" end
    return "number"
  end
  if t == "string" then return "string" end
  if t == "boolean" then return "boolean" end
  if t == "table" then
    if next(v) == nil then return "empty" end
    if v[1] ~= nil then return "array" end
    return "object"
  end
  return "null"
end

local function is(v, want)
  local k = kind(v)
  if want == "number" then return k == "number" or k == "integer" end
  if want == "object" or want == "array" then return k == want or k == "empty" end
  return k == want
end

local function check(v, s, path, depth)
  if depth > 32 then return path .. ": schema nested too deeply" end
  if s.type ~= nil and not is(v, s.type) then
    return path .. ": expected " .. s.type .. ", got " .. kind(v)
  end
  if s.enum ~= nil then
    local found = false
    for _, e in ipairs(s.enum) do if e == v then found = true end end
    if not found then return path .. ": not one of the allowed values" end
  end
  if type(v) == "number" then
    if s.minimum ~= nil and v < s.minimum then return path .. ": below " .. s.minimum end
    if s.maximum ~= nil and v > s.maximum then return path .. ": above " .. s.maximum end
  elseif type(v) == "string" then
    if s.minLength ~= nil and utf8.len(v) < s.minLength then return path .. ": shorter than " .. s.minLength end
    if s.maxLength ~= nil and utf8.len(v) > s.maxLength then return path .. ": longer than " .. s.maxLength end
  elseif type(v) == "table" then
    for _, name in ipairs(s.required or {}) do
      if v[name] == nil then return path .. ": " .. name .. " is required" end
    end
    if s.properties ~= nil then
      for name, sub in pairs(s.properties) do
        if v[name] ~= nil then
          local e = check(v[name], sub, path .. "." .. name, depth + 1)
          if e then return e end
        end
      end
      if s.additionalProperties == false then
        for name, _ in pairs(v) do
          if s.properties[name] == nil then return path .. ": " .. tostring(name) .. " is not allowed" end
        end
      end
    end
    if s.items ~= nil or s.minItems ~= nil or s.maxItems ~= nil then
      if s.minItems ~= nil and #v < s.minItems then return path .. ": fewer than " .. s.minItems .. " items" end
      if s.maxItems ~= nil and #v > s.maxItems then return path .. ": more than " .. s.maxItems .. " items" end
      if s.items ~= nil then
        for i, item in ipairs(v) do
          local e = check(item, s.items, path .. "[" .. i .. "]", depth + 1)
          if e then return e end
        end
      end
    end
  end
  return nil
end

return {
  on_message = function(msg, device, conf, state)
    local body, why = msg:json()
    local problem
    if body == nil then
      if not conf.require_json then return nil end
      problem = "$: " .. why
    else
      problem = check(body, conf.schema, "$", 0)
    end
    if problem == nil then return nil end
    if conf.on_invalid == "drop" then return "drop" end
    if conf.on_invalid == "reject" then return hub.reject(conf.reject_code, problem) end
    msg.props[conf.mark_property] = problem
    return nil
  end,
}
