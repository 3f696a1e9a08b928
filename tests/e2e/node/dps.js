// The Node provisioning SDKs against roost's provisioning service (issue 12): the service
// client (azure-iot-provisioning-service) makes a symmetric-key enrollment group and an X.509
// individual enrollment, reads, queries and deletes them; the device client
// (azure-iot-provisioning-device) registers over Mqtt (a group-derived key), Http (the X.509
// certificate, and a symmetric key), Amqp (a derived key by SASL PLAIN; the certificate) and
// MqttWs and AmqpWs (the certificate, over the service's HTTPS port), then each device connects to the hub it was
// assigned and sends. Only where the SDKs dial is changed: the service client's and the Http
// transport's HTTPS go through an agent to the service's port (they always dial 443); the Mqtt
// transport takes host:port; the CA is trusted through setOptions or NODE_EXTRA_CA_CERTS.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { Http: HttpBase } = require('azure-iot-http-base');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt, MqttWs: ProvisioningMqttWs } = require('azure-iot-provisioning-device-mqtt');
const { Http: ProvisioningHttp } = require('azure-iot-provisioning-device-http');
const { Amqp: ProvisioningAmqp, AmqpWs: ProvisioningAmqpWs } = require('azure-iot-provisioning-device-amqp');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { env, ca, portAgent, run, check, withTimeout } = require('./hub');

const dpsCs = env('ROOST_DPS_CS');
const idScope = env('ROOST_DPS_SCOPE');
const dpsHttpsPort = Number(env('ROOST_DPS_HTTPS_PORT'));
const dpsMqttPort = env('ROOST_DPS_MQTT_PORT');
const dpsAmqpPort = env('ROOST_DPS_AMQP_PORT');
const mqttPort = env('ROOST_MQTT_PORT');
const suffix = env('ROOST_SUFFIX');
const cert = fs.readFileSync(env('ROOST_CERT'), 'utf8');
const key = fs.readFileSync(env('ROOST_KEY'), 'utf8');

const agent = portAgent(dpsHttpsPort, false);

// The WebSocket transports always dial 443: point them at the service's HTTPS port.
ProvisioningMqttWs.prototype._getConnectionUri = () => `wss://localhost:${dpsHttpsPort}/$iothub/websocket`;
ProvisioningAmqpWs.prototype._getConnectionUri = () => `wss://localhost:${dpsHttpsPort}/$iothub/websocket`;

const service = ProvisioningServiceClient.fromConnectionString(dpsCs);
service._restApiClient.setOptions({ ca, http: { agent } });

const groupId = `nodegroup-${suffix}`;
const mqttReg = `node-mqtt-${suffix}`;
const httpReg = `node-http-${suffix}`;
const amqpReg = `node-amqp-${suffix}`;
const x509Reg = env('ROOST_X509_REG');
let groupKey;
let individualKey;

function register(transport, security) {
  const client = ProvisioningDeviceClient.create('localhost', idScope, transport, security);
  return withTimeout(client.register(), 60000, 'register');
}

function httpTransport() {
  const base = new HttpBase();
  base.setOptions({ ca, http: { agent } });
  return new ProvisioningHttp(base);
}

async function sendFrom(result, deviceKey, messageId) {
  check(result.status === 'assigned', `status ${result.status}`);
  const conn = `HostName=${result.assignedHub};DeviceId=${result.deviceId};SharedAccessKey=${deviceKey};GatewayHostName=localhost:${mqttPort}`;
  const device = DeviceClient.fromConnectionString(conn, Mqtt);
  await device.setOptions({ ca });
  await withTimeout(device.open(), 20000, 'open');
  const m = new Message('provisioned by node');
  m.messageId = messageId;
  await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
  await device.close();
}

run([
  ['createOrUpdateEnrollmentGroup (symmetric key, initial twin)', async () => {
    const { responseBody: g } = await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: groupId,
      attestation: { type: 'symmetricKey' },
      initialTwin: { tags: { by: 'node' }, properties: { desired: { mode: 'eco' } } },
    });
    check(g.enrollmentGroupId === groupId && g.etag, JSON.stringify(g));
    groupKey = g.attestation.symmetricKey.primaryKey;
    check(groupKey, 'the service generated the group key');
  }],
  ['createOrUpdateIndividualEnrollment (X.509 and symmetric key)', async () => {
    const { responseBody: e } = await service.createOrUpdateIndividualEnrollment({
      registrationId: x509Reg,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: cert } } } },
    });
    check(e.attestation.x509.clientCertificates.primary.info.sha256Thumbprint, JSON.stringify(e));
    const { responseBody: s } = await service.createOrUpdateIndividualEnrollment({
      registrationId: httpReg,
      attestation: { type: 'symmetricKey' },
    });
    individualKey = s.attestation.symmetricKey.primaryKey;
    const { responseBody: got } = await service.getIndividualEnrollment(httpReg);
    check(got.etag === s.etag, 'get answers the enrollment');
  }],
  ['query the enrollments', async () => {
    const query = service.createIndividualEnrollmentQuery({ query: '*' }, 100);
    const { responseBody: page } = await query.next();
    const ids = page.map((e) => e.registrationId);
    check(ids.includes(httpReg) && ids.includes(x509Reg), `ids ${ids}`);
  }],
  ['register over Mqtt with the group-derived key, then connect', async () => {
    const derived = crypto.createHmac('SHA256', Buffer.from(groupKey, 'base64')).update(mqttReg, 'utf8').digest('base64');
    const security = new SymmetricKeySecurityClient(mqttReg, derived);
    const transport = new ProvisioningMqtt();
    const client = ProvisioningDeviceClient.create(`localhost:${dpsMqttPort}`, idScope, transport, security);
    const result = await withTimeout(client.register(), 60000, 'register');
    check(result.deviceId === mqttReg, JSON.stringify(result));
    await sendFrom(result, derived, 'dps-node-mqtt');
  }],
  ['register over Http with a symmetric key, then connect', async () => {
    const result = await register(httpTransport(), new SymmetricKeySecurityClient(httpReg, individualKey));
    await sendFrom(result, individualKey, 'dps-node-http');
  }],
  ['register over Http with the X.509 certificate', async () => {
    const result = await register(httpTransport(), new X509Security(x509Reg, { cert, key }));
    check(result.status === 'assigned' && result.deviceId === x509Reg, JSON.stringify(result));
  }],
  ['register over Amqp with the group-derived key (SASL PLAIN), then connect', async () => {
    const derived = crypto.createHmac('SHA256', Buffer.from(groupKey, 'base64')).update(amqpReg, 'utf8').digest('base64');
    const client = ProvisioningDeviceClient.create(`localhost:${dpsAmqpPort}`, idScope, new ProvisioningAmqp(),
      new SymmetricKeySecurityClient(amqpReg, derived));
    const result = await withTimeout(client.register(), 60000, 'register');
    await sendFrom(result, derived, 'dps-node-amqp');
  }],
  ['register over Amqp with the X.509 certificate (no SASL)', async () => {
    const client = ProvisioningDeviceClient.create(`localhost:${dpsAmqpPort}`, idScope, new ProvisioningAmqp(),
      new X509Security(x509Reg, { cert, key }));
    const result = await withTimeout(client.register(), 60000, 'register');
    check(result.status === 'assigned' && result.deviceId === x509Reg, JSON.stringify(result));
  }],
  ['register over MqttWs and AmqpWs (port 443 WebSockets) with the certificate', async () => {
    for (const Transport of [ProvisioningMqttWs, ProvisioningAmqpWs]) {
      const client = ProvisioningDeviceClient.create('localhost', idScope, new Transport(),
        new X509Security(x509Reg, { cert, key }));
      const result = await withTimeout(client.register(), 60000, `register over ${Transport.name}`);
      check(result.status === 'assigned' && result.deviceId === x509Reg, JSON.stringify(result));
    }
  }],
  ['getDeviceRegistrationState, then delete the enrollments', async () => {
    const { responseBody: st } = await service.getDeviceRegistrationState(mqttReg);
    check(st.status === 'assigned' && st.assignedHub, JSON.stringify(st));
    await service.deleteIndividualEnrollment(httpReg);
    await service.deleteIndividualEnrollment(x509Reg);
    await service.deleteEnrollmentGroup(groupId);
    try {
      await service.getEnrollmentGroup(groupId);
      check(false, 'the group is gone');
    } catch (e) {
      check(e.response && e.response.statusCode === 404, `answer ${e}`);
    }
  }],
]);
