-- twin_tags: copies the sender's twin tags into application properties, so every endpoint
-- sees where a device is (site, building, line) without a registry lookup of its own.
return {
  on_message = function(msg, device, conf, state)
    local tags = device.tags
    for prop, path in pairs(conf.tags) do
      local v = hub.path_get(tags, path)
      if v == nil or type(v) == "table" then
        if conf.missing == "drop" then return "drop" end
        if conf.missing == "reject" then
          return hub.reject(conf.reject_code, "twin tag " .. path .. " is missing")
        end
      elseif conf.overwrite or msg.props[prop] == nil then
        msg.props[prop] = v
      end
    end
    return nil
  end,
}
