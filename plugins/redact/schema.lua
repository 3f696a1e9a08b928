return {
  fields = {
    -- Dotted paths into the JSON body ("user.email", "readings.1.raw").
    paths = { type = "array", items = "string", default = {} },
    -- Application property names.
    props = { type = "array", items = "string", default = {} },
    mode = { type = "string", one_of = { "mask", "remove" }, default = "mask" },
    mask = { type = "string", default = "***" },
  },
}
