// The unmodified Event Hubs client for Node (@azure/event-hubs) reading a roost hub's built-in
// endpoint: partition ids, then the telemetry a device sent, from the start of its partition.
// The hub's CA comes in NODE_EXTRA_CA_CERTS (set by tests/e2e/test_node.py); the SDK's fixed
// port is 5671, so customEndpointAddress points it at the hub's AMQP port.
'use strict';
const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');
const { env, run, check, withTimeout } = require('./hub');

const connectionString = env('ROOST_EVENTHUBS_CS');
const options = { customEndpointAddress: `sb://localhost:${env('ROOST_AMQP_PORT')}` };
const device = env('ROOST_DEVICE_ID');
const partition = env('ROOST_PARTITION');
const want = Number(env('ROOST_COUNT'));

const client = new EventHubConsumerClient('$Default', connectionString, options);

function decoded(body) {
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) return JSON.parse(Buffer.from(body).toString('utf8'));
  return body;
}

run([
  ['EventHubConsumerClient.getPartitionIds', async () => {
    const ids = await withTimeout(client.getPartitionIds(), 30000, 'getPartitionIds');
    check(ids.includes(partition), `ids ${JSON.stringify(ids)}`);
    return ids;
  }],
  ['subscribe reads the device telemetry from the start', async () => {
    const mine = [];
    let subscription;
    await withTimeout(new Promise((resolve, reject) => {
      subscription = client.subscribe(partition, {
        processEvents: async (events) => {
          for (const e of events) {
            if (e.systemProperties['iothub-connection-device-id'] === device
                && e.systemProperties['iothub-message-source'] === 'Telemetry') {
              mine.push(e);
            }
          }
          if (mine.length >= want) resolve();
        },
        processError: async (err) => reject(err),
      }, { startPosition: earliestEventPosition, maxWaitTimeInSeconds: 1 });
    }), 30000, 'events');
    await subscription.close();
    const ns = mine.map((e) => decoded(e.body).n);
    check(JSON.stringify(ns) === JSON.stringify([...Array(want).keys()]), `bodies ${JSON.stringify(ns)}`);
    check(mine[0].properties.level === 'critical', `properties ${JSON.stringify(mine[0].properties)}`);
    check(typeof mine[0].offset === 'string' || typeof mine[0].offset === 'number', 'an offset');
    check(mine[0].enqueuedTimeUtc instanceof Date, 'an enqueued time');
    return { events: mine.length, offset: mine[0].offset, sequenceNumber: mine[0].sequenceNumber };
  }],
  ['close', async () => { await client.close(); }],
]);
