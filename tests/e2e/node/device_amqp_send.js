// The Node device SDK over AMQP doing the least a device does: open (put-token), send one
// event, read its twin, close. Used with a recording proxy in front of the hub to capture the
// SDK's own frames (tests/e2e/amqp_capture.py).
'use strict';
const { Message } = require('azure-iot-common');
const { Client: DeviceClient } = require('azure-iot-device');
const { Amqp } = require('azure-iot-device-amqp');
const { env, ca, run, withTimeout } = require('./hub');

const device = DeviceClient.fromConnectionString(env('ROOST_DEVICE_CS'), Amqp);
device.setOptions({ ca });

run([
  ['open', () => withTimeout(device.open(), 20000, 'open')],
  ['sendEvent', async () => {
    const m = new Message('{"captured":true}');
    m.messageId = 'captured-1';
    m.properties.add('level', 'info');
    await withTimeout(device.sendEvent(m), 20000, 'sendEvent');
  }],
  ['getTwin', async () => {
    const twin = await withTimeout(device.getTwin(), 20000, 'getTwin');
    return twin.properties.reported.$version;
  }],
  ['close', () => device.close()],
]);
