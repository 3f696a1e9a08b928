return {
  fields = {
    -- Application property name -> dotted tag path ("location.site").
    tags = { type = "map", values = "string", required = true },
    -- What to do when a tag is missing (or is not a single value).
    missing = { type = "string", one_of = { "skip", "drop", "reject" }, default = "skip" },
    reject_code = { type = "integer", min = 400, max = 599, default = 400 },
    -- Whether a tag replaces a property the device already set.
    overwrite = { type = "boolean", default = false },
  },
}
