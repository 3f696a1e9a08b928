// File upload with the Node SDKs (issue 12): the device's uploadToBlob asks the hub for an
// upload target over HTTPS, uploads with @azure/storage-blob (in blocks, as it always does) to
// roost's blob store, and notifies the hub; the service's getFileNotificationReceiver then
// receives the notification over AMQP. Only where the SDKs dial is changed: the device's HTTPS
// goes through an agent to the hub's port 443 listener (the SDK always dials 443), the
// service's AMQP to the hub's AMQP port; the CA through setOptions and NODE_EXTRA_CA_CERTS.
'use strict';
const { Readable } = require('stream');
const { Client: DeviceClient } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { env, ca, portAgent, serviceClients, run, check, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const httpsPort = Number(env('ROOST_HTTPS_PORT'));
const amqpPort = env('ROOST_AMQP_PORT');
const id = env('ROOST_DEVICE_ID');
const { host, registry, service } = serviceClients(cs, amqpPort);

const content = Buffer.alloc(5 * 1024 * 1024 + 123, 'roost');
let device;
let notification;

run([
  ['Registry.create', async () => {
    await registry.create({ deviceId: id });
  }],
  ['uploadToBlob (more than one 4 MiB block)', async () => {
    const { responseBody: d } = await registry.get(id);
    const conn = `HostName=${host};DeviceId=${id};SharedAccessKey=${d.authentication.symmetricKey.primaryKey}`;
    device = DeviceClient.fromConnectionString(conn, Http);
    // (The Http transport answers setOptions only when a receivePolicy is among the options.)
    await device.setOptions({ ca, http: { agent: portAgent(httpsPort, false), receivePolicy: { interval: 60 } } });
    const receiver = await withTimeout(new Promise((resolve, reject) => service.getFileNotificationReceiver(
      (err, r) => (err ? reject(err) : resolve(r)))), 20000, 'file notification receiver');
    const received = new Promise((resolve) => {
      receiver.on('message', (msg) => {
        const body = JSON.parse(msg.getData().toString());
        if (body.deviceId !== id) return;
        receiver.complete(msg, () => resolve(body));
      });
    });
    for (let i = 0; ; i++) {
      try {
        await withTimeout(device.uploadToBlob('node/report.bin', Readable.from([content]), content.length), 60000, 'uploadToBlob');
        break;
      } catch (e) {
        // The engine learns of a new device a moment after the service API.
        if (i >= 20) throw e;
        await new Promise((r) => setTimeout(r, 300));
      }
    }
    notification = await withTimeout(received, 20000, 'the file notification');
  }],
  ['the notification names the blob and its size', async () => {
    check(notification.blobName === `${id}/node/report.bin`, JSON.stringify(notification));
    check(notification.blobSizeInBytes === content.length, JSON.stringify(notification));
    check(notification.blobUri.endsWith(`/fileuploads/${id}/node/report.bin`), notification.blobUri);
    check(notification.enqueuedTimeUtc && notification.lastUpdatedTime, JSON.stringify(notification));
    await device.close();
    await service.close();
  }],
]);
