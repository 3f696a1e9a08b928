// The Node device SDK's Http transport (azure-iot-device-http) against a roost hub's port 443
// listener: telemetry (sendEvent, sendEventBatch) and cloud-to-device messages received by its
// polling receiver and completed, rejected and abandoned. Only where it dials is changed: its
// requests go through an agent that trusts the hub's CA and connects to the test's port (the
// SDK always dials 443).
'use strict';
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { env, ca, portAgent, serviceClients, run, check, until, sleep, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const httpsPort = Number(env('ROOST_HTTPS_PORT'));
const amqpPort = env('ROOST_AMQP_PORT');
const id = env('ROOST_DEVICE_ID');
const { host, registry, service } = serviceClients(cs, amqpPort);

let device;
const received = [];

run([
  ['Client.fromConnectionString(cs, Http)', async () => {
    const { responseBody: d } = await registry.create({ deviceId: id });
    device = DeviceClient.fromConnectionString(
      `HostName=${host};DeviceId=${id};SharedAccessKey=${d.authentication.symmetricKey.primaryKey}`, Http);
    device.setOptions({ ca, http: { agent: portAgent(httpsPort), receivePolicy: { interval: 1 } } });
    await withTimeout(device.open(), 20000, 'open');
  }],
  ['sendEvent and sendEventBatch', async () => {
    const m = new Message('{"over":"Http"}');
    m.messageId = 'http-node-1';
    m.properties.add('transport', 'Http');
    // The device reaches the engine's registry replica asynchronously: retry an early 401.
    const deadline = Date.now() + 10000;
    for (;;) {
      try {
        await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
        break;
      } catch (e) {
        if (Date.now() > deadline || e.constructor.name !== 'UnauthorizedError') throw e;
        await sleep(200);
      }
    }
    const batch = ['http-node-b1', 'http-node-b2'].map((mid) => {
      const b = new Message(`batch ${mid}`);
      b.messageId = mid;
      return b;
    });
    await withTimeout(device.sendEventBatch(batch), 20000, 'sendEventBatch');
  }],
  ['C2D received by polling: complete, reject, abandon', async () => {
    await withTimeout(service.open(), 20000, 'service open');
    device.on('message', (m) => {
      received.push(m.messageId);
      const seen = received.filter((x) => x === m.messageId).length;
      const done = (e) => { if (e) console.error(e); };
      if (m.messageId === 'http-c2d-reject') device.reject(m, done);
      else if (m.messageId === 'http-c2d-abandon' && seen === 1) device.abandon(m, done);
      else device.complete(m, done);
    });
    for (const mid of ['http-c2d-complete', 'http-c2d-reject', 'http-c2d-abandon']) {
      const m = new Message(`body of ${mid}`);
      m.messageId = mid;
      m.ack = 'full';
      await withTimeout(service.send(id, m), 20000, `send ${mid}`);
      await until(`${mid} received`, () => received.includes(mid));
    }
    await until(`the abandoned message came again: ${JSON.stringify(received)}`,
      () => received.filter((x) => x === 'http-c2d-abandon').length === 2);
    return received;
  }],
  ['close', async () => {
    await sleep(1500);
    await device.close();
    await service.close();
  }],
]);
