// The Node device SDK over AMQP (azure-iot-device-amqp, the Amqp transport) against a roost
// hub: put-token with the device's token, telemetry acknowledged once durable, cloud-to-device
// messages completed, rejected and abandoned (each outcome seen in the feedback and the
// redelivery), a direct method answered, the twin read, reported and its desired changes
// received; and a module over AMQP. Only where the SDKs dial is changed: the device goes to
// GatewayHostName=localhost:{amqp port} with the hub's CA, the service Client's AMQP URI gets
// the test port, the REST clients go through the hub's service port.
'use strict';
const { Message } = require('azure-iot-common');
const { Client: DeviceClient, ModuleClient } = require('azure-iot-device');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');
const { env, ca, serviceClients, run, check, until, sleep, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const amqpPort = env('ROOST_AMQP_PORT');
// ROOST_TRANSPORT=AmqpWs: the devices go over AMQP in WebSockets to the hub's port 443 listener
// (the SDK always dials wss://{host}:443/$iothub/websocket; only the port is changed here).
const overWs = process.env.ROOST_TRANSPORT === 'AmqpWs';
const Transport = overWs ? AmqpWs : Amqp;
if (overWs) {
  const httpsPort = env('ROOST_HTTPS_PORT');
  AmqpWs.prototype._getConnectionUri = () => `wss://localhost:${httpsPort}/$iothub/websocket`;
}
const id = env('ROOST_DEVICE_ID');
const { host, registry, service } = serviceClients(cs, amqpPort);
let device;
let twin;
let moduleClient;
const received = [];
const desired = [];
const batches = [];

function c2d(messageId, body) {
  const m = new Message(body);
  m.messageId = messageId;
  m.ack = 'full';
  return m;
}

run([
  ['Client.fromConnectionString(cs, Amqp or AmqpWs).open', async () => {
    const { responseBody: d } = await registry.create({ deviceId: id });
    const conn = `HostName=${host};DeviceId=${id};SharedAccessKey=${d.authentication.symmetricKey.primaryKey};GatewayHostName=localhost:${amqpPort}`;
    device = DeviceClient.fromConnectionString(conn, Transport);
    device.setOptions({ ca });
    await withTimeout(device.open(), 20000, 'open');
  }],
  ['sendEvent is acknowledged', async () => {
    const m = new Message(JSON.stringify({ temperature: 21.5 }));
    m.messageId = 'amqp-telemetry-1';
    m.contentType = 'application/json';
    m.contentEncoding = 'utf-8';
    m.properties.add('level', 'critical');
    const r = await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
    return r.transportObj && r.transportObj.constructor.name;
  }],
  ['C2D: complete, reject and abandon', async () => {
    await withTimeout(service.open(), 20000, 'service open');
    const feedback = await withTimeout(new Promise((resolve, reject) => service.getFeedbackReceiver(
      (err, receiver) => (err ? reject(err) : resolve(receiver)))), 20000, 'feedback receiver');
    feedback.on('message', (m) => batches.push(JSON.parse(m.data.toString())));
    device.on('message', (m) => {
      received.push(m.messageId);
      const seen = received.filter((x) => x === m.messageId).length;
      const done = (e) => { if (e) console.error(e); };
      if (m.messageId === 'amqp-c2d-reject') device.reject(m, done);
      else if (m.messageId === 'amqp-c2d-abandon' && seen === 1) device.abandon(m, done);
      else device.complete(m, done);
    });
    // One at a time: rhea 1.0.24 writes the dispositions of consecutive deliveries settled in
    // the same tick as one range with the first one's outcome (write_dispositions compares
    // outcomes only once a range holds two), so messages settled together with different
    // outcomes would all get the first.
    for (const mid of ['amqp-c2d-complete', 'amqp-c2d-reject', 'amqp-c2d-abandon']) {
      await withTimeout(service.send(id, c2d(mid, `body of ${mid}`)), 20000, `send ${mid}`);
      await until(`${mid} received`, () => received.includes(mid));
      await sleep(200);
    }
    const records = () => batches.flat().filter((r) => r.deviceId === id);
    await until(`feedback for every message, got ${JSON.stringify(batches)}`, () => records().length >= 3);
    const status = Object.fromEntries(records().map((r) => [r.originalMessageId, r.statusCode]));
    check(status['amqp-c2d-complete'] === 'Success', JSON.stringify(status));
    check(status['amqp-c2d-reject'] === 'Rejected', JSON.stringify(status));
    check(status['amqp-c2d-abandon'] === 'Success', JSON.stringify(status));
    const abandoned = received.filter((x) => x === 'amqp-c2d-abandon').length;
    check(abandoned === 2, `the abandoned message came again, received ${JSON.stringify(received)}`);
    const { responseBody: d } = await registry.get(id);
    check(d.cloudToDeviceMessageCount === 0, `queue empty, got ${d.cloudToDeviceMessageCount}`);
    return { received, status };
  }],
  ['a direct method is answered over AMQP', async () => {
    device.onDeviceMethod('echo', (req, res) => res.send(201, { echo: req.payload }));
    const deadline = Date.now() + 15000;
    for (;;) {
      try {
        const { result } = await service.invokeDeviceMethod(id, { methodName: 'echo', payload: { n: 3 }, responseTimeoutInSeconds: 10 });
        check(result.status === 201 && result.payload.echo.n === 3, `answer ${JSON.stringify(result)}`);
        return result;
      } catch (e) {
        // Attaching the method links is asynchronous: until then the hub answers 404103.
        const text = String(e.message) + JSON.stringify(e.responseBody || '');
        if (Date.now() > deadline || !/404103|Not found/.test(text)) throw e;
        await sleep(200);
      }
    }
  }],
  ['the twin: get, report, desired changes', async () => {
    twin = await withTimeout(device.getTwin(), 20000, 'getTwin');
    twin.on('properties.desired', (patch) => desired.push(patch));
    await withTimeout(new Promise((ok, bad) => twin.properties.reported.update({ fw: 'amqp-1' }, (e) => (e ? bad(e) : ok()))), 20000, 'report');
    const { responseBody: t } = await registry.getTwin(id);
    check(t.properties.reported.fw === 'amqp-1', `reported fw, got ${JSON.stringify(t.properties.reported)}`);
    await registry.updateTwin(id, { properties: { desired: { rate: 9 } } }, t.etag);
    await until(`desired patch received, got ${JSON.stringify(desired)}`, () => desired.some((p) => p.rate === 9));
    return { reportedVersion: t.properties.reported.$version, desired: desired.length };
  }],
  ['a module over AMQP sends telemetry', async () => {
    await registry.addModule({ deviceId: id, moduleId: 'amqpmod' });
    const { responseBody: m } = await registry.getModule(id, 'amqpmod');
    const conn = `HostName=${host};DeviceId=${id};ModuleId=amqpmod;SharedAccessKey=${m.authentication.symmetricKey.primaryKey};GatewayHostName=localhost:${amqpPort}`;
    moduleClient = ModuleClient.fromConnectionString(conn, Transport);
    moduleClient.setOptions({ ca });
    await withTimeout(moduleClient.open(), 20000, 'module open');
    const msg = new Message('from the module');
    msg.messageId = 'amqp-module-1';
    await withTimeout(moduleClient.sendEvent(msg), 20000, 'module sendEvent');
  }],
  ['close', async () => {
    await moduleClient.close();
    await device.close();
    await service.close();
  }],
]);
