// Points the official Node SDKs at a local roost hub (wire spec §9) without changing them:
// the service clients' HTTPS goes through an agent that trusts the hub's CA and connects to the
// hub's service port (the SDK always dials 443) — or, with no ROOST_SERVICE_PORT, to the SDK's
// own default, https://{HostName}:443, trusting the CA through NODE_EXTRA_CA_CERTS; the device
// client's MQTT goes to GatewayHostName=host:port with the CA in setOptions({ca}).
'use strict';
const fs = require('fs');
const https = require('https');

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};

const ca = fs.readFileSync(env('ROOST_CA'), 'utf8');
const servicePort = process.env.ROOST_SERVICE_PORT ? Number(process.env.ROOST_SERVICE_PORT) : null;

/**
 * An HTTPS agent that trusts the hub's CA and dials `port` whatever port a request names: the
 * SDKs' HTTPS clients always dial 443.
 */
function portAgent(port, keepAlive = true) {
  class PortAgent extends https.Agent {
    createConnection(options, callback) {
      return super.createConnection({ ...options, port: Number(port) }, callback);
    }
  }
  return new PortAgent({ keepAlive, ca });
}

const agent = servicePort !== null ? portAgent(servicePort) : null;

/**
 * A service SDK client (Registry, Client, JobClient) sent to the hub's service port; as it is
 * when the hub serves the SDK's default port.
 */
function pointed(client) {
  if (servicePort !== null) client._restApiClient.setOptions({ http: { agent }, ca });
  return client;
}

/** Runs `steps` in order; prints one JSON line per step; exits 1 at the first failure. */
async function run(steps) {
  // A step awaiting a promise nothing will settle lets the event loop empty and Node exit 0
  // mid-run: report that step as failed instead of passing silently.
  let current = null;
  process.on('exit', (code) => {
    if (code === 0 && current !== null) {
      console.log(JSON.stringify({ step: current, ok: false, error: 'Node exited before the step finished (a promise nothing settles)' }));
      process.exitCode = 1;
    }
  });
  for (const [name, step] of steps) {
    current = name;
    try {
      const detail = await step();
      console.log(JSON.stringify({ step: name, ok: true, detail: detail === undefined ? null : detail }));
    } catch (e) {
      console.log(JSON.stringify({ step: name, ok: false, error: String(e && e.stack || e), name: e && e.constructor && e.constructor.name }));
      process.exit(1);
    }
  }
  current = null;
  process.exit(0);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

/**
 * The service clients of connection string `cs`, pointed at the hub: `registry` (REST) and
 * `service` (its C2D and feedback over AMQP to `amqpPort`, when given; the SDK always dials
 * 5671), and the hub's host name.
 */
function serviceClients(cs, amqpPort) {
  const { Registry, Client } = require('azure-iothub');
  const host = cs.split(';').find((p) => p.startsWith('HostName=')).slice('HostName='.length);
  const registry = pointed(Registry.fromConnectionString(cs));
  const service = pointed(Client.fromConnectionString(cs));
  if (amqpPort) service._transport._getConnectionUri = () => `amqps://${host}:${amqpPort}`;
  return { host, registry, service };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `cond()` holds, failing with `what` after `ms`. */
async function until(what, cond, ms = 20000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    check(Date.now() < deadline, what);
    await sleep(100);
  }
}

function withTimeout(promise, ms, what) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms)),
  ]);
}

module.exports = { env, ca, pointed, portAgent, serviceClients, run, check, until, sleep, withTimeout };
