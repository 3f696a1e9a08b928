-- redact: masks or removes configured fields of a JSON body and configured application
-- properties before a message is stored, so secrets and personal data never reach an endpoint.
return {
  on_message = function(msg, device, conf, state)
    for _, name in ipairs(conf.props or {}) do
      if msg.props[name] ~= nil then
        if conf.mode == "remove" then msg.props[name] = nil else msg.props[name] = conf.mask end
      end
    end
    if #(conf.paths or {}) == 0 then return nil end
    local body = msg:json()
    if body == nil then return nil end
    local changed = false
    for _, path in ipairs(conf.paths) do
      if hub.path_get(body, path) ~= nil then
        if conf.mode == "remove" then hub.path_set(body, path, nil) else hub.path_set(body, path, conf.mask) end
        changed = true
      end
    end
    if changed then msg:set_json(body) end
    return nil
  end,
}
