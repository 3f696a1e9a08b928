-- roost's default routing configuration (DESIGN.md §5).
--
-- Until the routing issue lands, the engine does not evaluate this file: every telemetry
-- message goes to the built-in `events` endpoint, which is exactly what this table says
-- (no routes, so everything takes the fallback route).
return {
  endpoints = {
    events = { kind = "builtin" },
  },
  routes = {},
  fallback = { endpoints = { "events" } },
}
