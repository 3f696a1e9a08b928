-- roost's default routing (DESIGN.md §5; the reference is docs/routing.md). `roost up` runs it
-- until `roost routes apply` hands control another file.
--
-- Telemetry matches no route here, so it takes the fallback route to the built-in `events`
-- endpoint. IoT Hub routes its own events (twin changes, lifecycle, connection state) nowhere
-- until a route names them; roost's default names them, so they land in `events` beside
-- telemetry — and so do the notifications of completed file uploads (roost's `file_upload`).
return {
  endpoints = {
    events = { kind = "builtin" },
  },
  routes = {
    { name = "twin-changes", source = "twin_change", condition = true, endpoints = { "events" } },
    { name = "lifecycle", source = "lifecycle", condition = true, endpoints = { "events" } },
    { name = "connection-state", source = "connection_state", condition = true, endpoints = { "events" } },
    { name = "file-uploads", source = "file_upload", condition = true, endpoints = { "events" } },
  },
  fallback = { endpoints = { "events" } },
}
