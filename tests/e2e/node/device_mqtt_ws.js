// The Node device SDK's MqttWs transport (MQTT in WebSockets) against a roost hub's port 443
// listener: open, telemetry, the twin (read, report), a direct method and a cloud-to-device
// message completed. Only where the SDKs dial is changed: MqttWs always dials
// wss://{host}:443/$iothub/websocket (here the test's port), the service Client's AMQP URI and
// the REST clients go to the test's ports.
'use strict';
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { MqttWs } = require('azure-iot-device-mqtt');
const { env, ca, serviceClients, run, check, until, sleep, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const httpsPort = env('ROOST_HTTPS_PORT');
const amqpPort = env('ROOST_AMQP_PORT');
const id = env('ROOST_DEVICE_ID');
const baseConfig = MqttWs.prototype._getBaseTransportConfig;
MqttWs.prototype._getBaseTransportConfig = function pointedAtTheTestPort(credentials) {
  const config = baseConfig.call(this, credentials);
  config.uri = config.uri.replace(':443/', `:${httpsPort}/`);
  return config;
};
const { host, registry, service } = serviceClients(cs, amqpPort);
let device;
const received = [];

run([
  ['Client.fromConnectionString(cs, MqttWs).open', async () => {
    const { responseBody: d } = await registry.create({ deviceId: id });
    device = DeviceClient.fromConnectionString(
      `HostName=${host};DeviceId=${id};SharedAccessKey=${d.authentication.symmetricKey.primaryKey}`, MqttWs);
    device.setOptions({ ca });
    await withTimeout(device.open(), 20000, 'open');
  }],
  ['sendEvent', async () => {
    const m = new Message('{"over":"MqttWs"}');
    m.messageId = 'mqttws-1';
    m.properties.add('transport', 'MqttWs');
    await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
  }],
  ['the twin: get and report', async () => {
    const twin = await withTimeout(device.getTwin(), 20000, 'getTwin');
    await withTimeout(new Promise((ok, bad) => twin.properties.reported.update({ ws: true }, (e) => (e ? bad(e) : ok()))), 20000, 'report');
    const { responseBody: t } = await registry.getTwin(id);
    check(t.properties.reported.ws === true, `reported, got ${JSON.stringify(t.properties.reported)}`);
  }],
  ['a direct method is answered', async () => {
    device.onDeviceMethod('echo', (req, res) => res.send(200, { echo: req.payload }));
    const deadline = Date.now() + 15000;
    for (;;) {
      try {
        const { result } = await service.invokeDeviceMethod(id, { methodName: 'echo', payload: 5, responseTimeoutInSeconds: 10 });
        check(result.status === 200 && result.payload.echo === 5, JSON.stringify(result));
        return result.payload;
      } catch (e) {
        const text = String(e.message) + JSON.stringify(e.responseBody || '');
        if (Date.now() > deadline || !/404103|Not found/.test(text)) throw e;
        await sleep(200);
      }
    }
  }],
  ['a C2D message is received and completed', async () => {
    device.on('message', (m) => {
      received.push(m.messageId);
      device.complete(m, () => {});
    });
    await sleep(500);
    const m = new Message('to MqttWs');
    m.messageId = 'mqttws-c2d';
    await withTimeout(service.send(id, m), 20000, 'send');
    await until('the C2D message arrived', () => received.includes('mqttws-c2d'));
  }],
  ['close', async () => {
    await device.close();
    await service.close();
  }],
]);
