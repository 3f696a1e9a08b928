-- The routing of the end-to-end routing benchmark (docs/benchmarks.md): ten declarative routes
-- over system and application properties, nine of which match nothing, and two plugins; every
-- roost-bench message (it carries the application property `run`) reaches `events` through
-- the last route, so the read-back counts it.
return {
  plugins = {
    { use = "twin_tags", config = { tags = { site = "site", building = "location.building" } } },
    { use = "redact", config = { props = { "secret", "token" } } },
  },
  routes = {
    { name = "r1", condition = "$connectionDeviceId = 'nobody'", endpoints = { "events" } },
    { name = "r2", condition = "$contentType = 'application/json'", endpoints = { "events" } },
    { name = "r3", condition = "level IN ['error', 'fatal']", endpoints = { "events" } },
    { name = "r4", condition = "STARTS_WITH($messageId, 'x-')", endpoints = { "events" } },
    { name = "r5", condition = "IS_DEFINED(alarm)", endpoints = { "events" } },
    { name = "r6", condition = "$contentEncoding = 'utf-16'", endpoints = { "events" } },
    { name = "r7", condition = "priority = 'high' AND $connectionModuleId = 'edge'", endpoints = { "events" } },
    { name = "r8", condition = "$twin.tags.site = 'north'", endpoints = { "events" } },
    { name = "r9", condition = "NOT IS_DEFINED(run) OR run = ''", endpoints = { "events" } },
    { name = "bench", condition = "IS_DEFINED(run)", endpoints = { "events" } },
  },
  fallback = false,
}
