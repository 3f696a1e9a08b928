// The Node service SDK's AMQP half (azure-iothub Client) against a roost hub: Client.send queues
// a cloud-to-device message over the /messages/devicebound link, a Node MQTT device receives
// it with its properties and completes it, the feedback receiver
// (/messages/serviceBound/feedback) delivers the Success record, and a send to an unknown
// device is DeviceNotFoundError. Only where the SDK dials is changed: its AMQP URI gets the
// hub's test port (the SDK always dials 5671); TLS trusts the hub's CA via NODE_EXTRA_CA_CERTS.
'use strict';
const errors = require('azure-iothub/dist/common-core/errors');
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { env, ca, serviceClients, run, check, until, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const mqttPort = env('ROOST_MQTT_PORT');
const amqpPort = env('ROOST_AMQP_PORT');
const id = env('ROOST_DEVICE_ID');
const { host, registry, service } = serviceClients(cs, amqpPort);
let device;
const received = [];
let feedback;
const batches = [];

run([
  ['a device over MQTT takes C2D', async () => {
    const { responseBody: d } = await registry.create({ deviceId: id });
    const conn = `HostName=${host};DeviceId=${id};SharedAccessKey=${d.authentication.symmetricKey.primaryKey};GatewayHostName=localhost:${mqttPort}`;
    device = DeviceClient.fromConnectionString(conn, Mqtt);
    device.setOptions({ ca });
    device.on('message', (m) => {
      received.push(m);
      device.complete(m, () => {});
    });
    await withTimeout(device.open(), 20000, 'device open');
  }],
  ['Client.open over AMQP (put-token with the policy)', async () => {
    await withTimeout(service.open(), 20000, 'service open');
  }],
  ['Client.getFeedbackReceiver', async () => {
    feedback = await withTimeout(new Promise((resolve, reject) => service.getFeedbackReceiver(
      (err, receiver) => (err ? reject(err) : resolve(receiver)))), 20000, 'feedback receiver');
    feedback.on('message', (m) => batches.push(JSON.parse(m.data.toString())));
  }],
  ['Client.send reaches the device with its properties', async () => {
    const m = new Message('{"hello":"node"}');
    m.messageId = 'node-c2d-1';
    m.correlationId = 'corr-1';
    m.ack = 'full';
    m.contentType = 'application/json';
    m.contentEncoding = 'utf-8';
    m.properties.add('colour', 'green');
    await withTimeout(service.send(id, m), 20000, 'send');
    await until('the device received the message', () => received.length > 0);
    check(received.length === 1, 'the device received the message once');
    const got = received[0];
    check(got.data.toString() === '{"hello":"node"}', `body ${got.data}`);
    check(got.messageId === 'node-c2d-1', `messageId ${got.messageId}`);
    check(got.correlationId === 'corr-1', `correlationId ${got.correlationId}`);
    check(got.properties.getValue('colour') === 'green', 'application property');
    return { messageId: got.messageId, contentType: got.contentType };
  }],
  ['the feedback receiver gets the Success record', async () => {
    const mine = () => batches.flat().filter((r) => r.originalMessageId === 'node-c2d-1');
    await until(`a feedback record for the message, batches: ${JSON.stringify(batches)}`, () => mine().length > 0);
    check(mine().length === 1, `one feedback record, batches: ${JSON.stringify(batches)}`);
    const [record] = mine();
    check(record.statusCode === 'Success' && record.deviceId === id, JSON.stringify(record));
    return record.statusCode;
  }],
  ['Client.send to an unknown device is DeviceNotFoundError', async () => {
    try {
      await withTimeout(service.send(`${id}-nope`, new Message('x')), 20000, 'send');
    } catch (e) {
      check(e instanceof errors.DeviceNotFoundError || e.constructor.name === 'DeviceNotFoundError',
        `typed error, got ${e.constructor.name}: ${e.message}`);
      return e.constructor.name;
    }
    throw new Error('sent to a device that does not exist');
  }],
  ['close', async () => {
    await service.close();
    await device.close();
    await registry.delete(id);
  }],
]);
