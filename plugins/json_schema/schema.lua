return {
  fields = {
    -- The JSON Schema subset the body must conform to.
    schema = { type = "table", required = true },
    -- "mark": keep the message with the problem in `mark_property`; "drop"; "reject".
    on_invalid = { type = "string", one_of = { "mark", "drop", "reject" }, default = "mark" },
    mark_property = { type = "string", default = "schema-error" },
    reject_code = { type = "integer", min = 400, max = 599, default = 400 },
    -- Whether a body that is not JSON at all is invalid (otherwise it is left alone).
    require_json = { type = "boolean", default = false },
  },
}
