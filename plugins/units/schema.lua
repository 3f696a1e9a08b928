return {
  fields = {
    -- Each: { path = "temperature", from = "degF", to = "degC", unit_prop = "temp-unit", decimals = 2 }.
    -- Units: degC degF K, kPa Pa psi bar, m cm ft in km mi, kg g lb, m/s km/h mph.
    conversions = { type = "array", items = "table", required = true },
    -- Rounding for every conversion that sets none (absent: no rounding).
    decimals = { type = "integer", min = 0, max = 12 },
  },
}
