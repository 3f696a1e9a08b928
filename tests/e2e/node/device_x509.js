// The Node device SDK authenticating with a client certificate: a device registered through
// the Node service SDK's Registry — with the certificate's thumbprint (selfSigned), or as
// certificateAuthority when ROOST_X509_AUTH says so (its certificate signed by a verified CA) —
// connects over MQTT with `x509=true` and setOptions({cert, key}), sends, reads its twin and
// reports; then the same over MqttWs (port 443), Amqp and AmqpWs, and telemetry over the Http transport. Only where the SDK dials is changed (the
// MQTT and WebSocket URIs' ports).
'use strict';
const fs = require('fs');
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');
const { Http } = require('azure-iot-device-http');
const { Amqp, AmqpWs } = require('azure-iot-device-amqp');
const { env, ca, portAgent, serviceClients, run, check, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const mqttPort = env('ROOST_MQTT_PORT');
const httpsPort = env('ROOST_HTTPS_PORT');
const amqpPort = env('ROOST_AMQP_PORT');
const id = env('ROOST_DEVICE_ID');
const cert = fs.readFileSync(env('ROOST_CERT'), 'utf8');
const key = fs.readFileSync(env('ROOST_KEY'), 'utf8');
const authType = process.env.ROOST_X509_AUTH || 'selfSigned';
const thumbprint = authType === 'selfSigned' ? env('ROOST_THUMBPRINT') : undefined;
// The SDK's X.509 credentials keep no GatewayHostName: point Mqtt's URI at the test's port.
const mqttConfig = Mqtt.prototype._getBaseTransportConfig;
Mqtt.prototype._getBaseTransportConfig = function pointedAtTheMqttPort(credentials) {
  const config = mqttConfig.call(this, credentials);
  config.uri = `mqtts://localhost:${mqttPort}`;
  return config;
};
const baseConfig = MqttWs.prototype._getBaseTransportConfig;
MqttWs.prototype._getBaseTransportConfig = function pointedAtTheTestPort(credentials) {
  const config = baseConfig.call(this, credentials);
  config.uri = config.uri.replace(':443/', `:${httpsPort}/`);
  return config;
};
// Amqp and AmqpWs too: a certificate, no $cbs put-token — the links are attached at once.
Amqp.prototype._getConnectionUri = () => `amqps://localhost:${amqpPort}`;
AmqpWs.prototype._getConnectionUri = () => `wss://localhost:${httpsPort}/$iothub/websocket`;
const { host, registry } = serviceClients(cs);

async function session(transport, connectionString, messageId) {
  const device = DeviceClient.fromConnectionString(connectionString, transport);
  await device.setOptions({ ca, cert, key });
  await withTimeout(device.open(), 20000, 'open');
  const m = new Message('{"auth":"x509"}');
  m.messageId = messageId;
  await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
  const twin = await withTimeout(device.getTwin(), 20000, 'getTwin');
  await withTimeout(new Promise((resolve, reject) => twin.properties.reported.update(
    { via: messageId }, (e) => (e ? reject(e) : resolve()))), 20000, 'report');
  await device.close();
}

run([
  [`Registry.create as ${authType}`, async () => {
    const authentication = authType === 'certificateAuthority'
      ? { type: 'certificateAuthority' }
      : { x509Thumbprint: { primaryThumbprint: thumbprint } };
    const { responseBody: d } = await registry.create({ deviceId: id, authentication });
    check(d.authentication.type === authType, `type ${d.authentication.type}`);
    return d.authentication.type;
  }],
  ['Mqtt with the certificate', async () => {
    // The engine learns of a new device a moment after the service API: retry briefly.
    const conn = `HostName=${host};DeviceId=${id};x509=true`;
    for (let i = 0; ; i++) {
      try { return await session(Mqtt, conn, 'x509-node-mqtt'); } catch (e) {
        if (i >= 20) throw e;
        await new Promise((r) => setTimeout(r, 300));
      }
    }
  }],
  ['MqttWs with the certificate', async () => {
    await session(MqttWs, `HostName=${host};DeviceId=${id};x509=true`, 'x509-node-ws');
  }],
  ['Amqp with the certificate', async () => {
    await session(Amqp, `HostName=${host};DeviceId=${id};x509=true`, 'x509-node-amqp');
  }],
  ['AmqpWs with the certificate', async () => {
    await session(AmqpWs, `HostName=${host};DeviceId=${id};x509=true`, 'x509-node-amqpws');
  }],
  ['Http with the certificate (no Authorization header)', async () => {
    const device = DeviceClient.fromConnectionString(`HostName=${host};DeviceId=${id};x509=true`, Http);
    // (The Http transport answers setOptions only when a receivePolicy is among the options.)
    await device.setOptions({ ca, cert, key, http: { agent: portAgent(httpsPort), receivePolicy: { interval: 1 } } });
    const m = new Message('{"auth":"x509","over":"https"}');
    m.messageId = 'x509-node-http';
    await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
    await device.close();
  }],
]);
