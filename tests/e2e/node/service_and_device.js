// The Node service SDK (azure-iothub) and device SDK (azure-iot-device + Mqtt) against a roost
// hub: Registry create/get/update/list/delete with typed errors, modules, twins, a direct
// method the device answers (the Node device SDK answers at QoS 0), a desired patch the device
// receives, a reported patch, a query, and a JobClient twin job.
'use strict';
const { Registry, Client, JobClient } = require('azure-iothub');
// The error classes azure-iothub throws (it carries its own copy of azure-iot-common's).
const errors = require('azure-iothub/dist/common-core/errors');
const { Client: DeviceClient } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { env, ca, pointed, run, check, withTimeout } = require('./hub');

const cs = env('ROOST_SERVICE_CS');
const mqttPort = env('ROOST_MQTT_PORT');
const id = env('ROOST_DEVICE_ID');
const registry = pointed(Registry.fromConnectionString(cs));
const service = pointed(Client.fromConnectionString(cs));
const jobs = pointed(JobClient.fromConnectionString(cs));
const host = cs.split(';').find((p) => p.startsWith('HostName=')).slice('HostName='.length);
let device;
let desired = [];

run([
  ['Registry.create generates keys', async () => {
    const { responseBody: d } = await registry.create({ deviceId: id });
    check(d.deviceId === id, 'deviceId');
    check(d.authentication.symmetricKey.primaryKey && d.authentication.symmetricKey.secondaryKey, 'both keys generated');
    return d.authentication.type;
  }],
  ['Registry.create again is DeviceAlreadyExistsError', async () => {
    try { await registry.create({ deviceId: id }); } catch (e) {
      check(e instanceof errors.DeviceAlreadyExistsError, `typed error, got ${e.constructor.name}: ${e.message}`);
      return e.constructor.name;
    }
    throw new Error('created twice');
  }],
  ['Registry.get of an unknown device is DeviceNotFoundError', async () => {
    try { await registry.get(`${id}-nope`); } catch (e) {
      check(e instanceof errors.DeviceNotFoundError, `typed error, got ${e.constructor.name}: ${e.message}`);
      return e.constructor.name;
    }
    throw new Error('found a device that does not exist');
  }],
  ['Registry.update and get', async () => {
    const { responseBody: d } = await registry.get(id);
    d.status = 'disabled';
    await registry.update(d);
    const { responseBody: after } = await registry.get(id);
    check(after.status === 'disabled', 'status updated');
    after.status = 'enabled';
    await registry.update(after);
    return after.etag;
  }],
  ['Registry.list', async () => {
    const { responseBody: list } = await registry.list();
    check(list.some((d) => d.deviceId === id), 'the device is listed');
    return list.length;
  }],
  ['Registry.addModule and getModulesOnDevice', async () => {
    await registry.addModule({ deviceId: id, moduleId: 'm1' });
    const { responseBody: mods } = await registry.getModulesOnDevice(id);
    check(mods.length === 1 && mods[0].moduleId === 'm1', 'one module');
    return mods[0].moduleId;
  }],
  ['device connects over MQTT', async () => {
    const { responseBody: d } = await registry.get(id);
    const conn = `HostName=${host};DeviceId=${id};SharedAccessKey=${d.authentication.symmetricKey.primaryKey};GatewayHostName=localhost:${mqttPort}`;
    device = DeviceClient.fromConnectionString(conn, Mqtt);
    device.setOptions({ ca });
    await withTimeout(device.open(), 20000, 'open');
    device.onDeviceMethod('reboot', (req, res) => res.send(200, { echo: req.payload }));
    const twin = await withTimeout(device.getTwin(), 20000, 'getTwin');
    twin.on('properties.desired', (patch) => desired.push(patch));
    await withTimeout(new Promise((ok, bad) => twin.properties.reported.update({ fw: 'node-1' }, (e) => (e ? bad(e) : ok()))), 20000, 'report');
    return twin.properties.desired.$version;
  }],
  ['Registry.getTwin sees the report; updateTwin reaches the device', async () => {
    const { responseBody: t } = await registry.getTwin(id);
    check(t.properties.reported.fw === 'node-1', `reported fw, got ${JSON.stringify(t.properties.reported)}`);
    await registry.updateTwin(id, { properties: { desired: { rate: 7 } } }, t.etag);
    const deadline = Date.now() + 15000;
    while (!desired.some((p) => p.rate === 7)) {
      check(Date.now() < deadline, `desired patch received, got ${JSON.stringify(desired)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    return desired.length;
  }],
  ['Client.invokeDeviceMethod is answered by the device', async () => {
    const deadline = Date.now() + 15000;
    for (;;) {
      try {
        const { result } = await service.invokeDeviceMethod(id, { methodName: 'reboot', payload: { delay: 2 }, responseTimeoutInSeconds: 10 });
        check(result.status === 200 && result.payload.echo.delay === 2, `answer ${JSON.stringify(result)}`);
        return result;
      } catch (e) {
        // Subscribing is asynchronous: until it is done the hub answers 404103.
        if (Date.now() > deadline || !String(e.message + (e.responseBody || '')).includes('404103')) throw e;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  }],
  ['Registry.createQuery', async () => {
    const q = registry.createQuery(`SELECT * FROM devices WHERE deviceId = '${id}'`, 10);
    const { result } = await q.nextAsTwin();
    check(result.length === 1 && result[0].deviceId === id, 'one twin');
    check(q.hasMoreResults === false, 'no continuation on the last page');
    return result[0].properties.reported.fw;
  }],
  ['JobClient.scheduleTwinUpdate and getJob', async () => {
    const jobId = `${id}-job`;
    await jobs.scheduleTwinUpdate(jobId, `deviceId = '${id}'`, { etag: '*', properties: { desired: { fromJob: true } } }, new Date(), 60);
    const deadline = Date.now() + 20000;
    for (;;) {
      const { jobStatus: job } = await jobs.getJob(jobId);
      if (job.status === 'completed') {
        check(job.deviceJobStatistics.succeededCount === 1, `statistics ${JSON.stringify(job.deviceJobStatistics)}`);
        break;
      }
      check(Date.now() < deadline && job.status !== 'failed', `job ${JSON.stringify(job)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    const { responseBody: t } = await registry.getTwin(id);
    check(t.properties.desired.fromJob === true, 'the job updated the twin');
    return jobId;
  }],
  ['JobClient.createQuery lists jobs; cancelJob cancels a scheduled one', async () => {
    const { result: done } = await jobs.createQuery('scheduleUpdateTwin', 'completed').next();
    check(Array.isArray(done) && done.some((j) => j.jobId === `${id}-job`), `listed ${JSON.stringify(done)}`);
    const later = `${id}-later`;
    await jobs.scheduleDeviceMethod(later, `deviceId = '${id}'`, { methodName: 'reboot', payload: null, responseTimeoutInSeconds: 30 }, new Date(Date.now() + 3600000), 60);
    const { jobStatus: scheduled } = await jobs.getJob(later);
    check(scheduled.status === 'scheduled', `status ${scheduled.status}`);
    const { jobStatus: cancelled } = await jobs.cancelJob(later);
    check(cancelled.status === 'cancelled', `status ${cancelled.status}`);
    return done.length;
  }],
  ['Registry.addConfiguration applies its content', async () => {
    const configId = `${id}-cfg`;
    await registry.addConfiguration({
      id: configId,
      content: { deviceContent: { 'properties.desired.fromConfig': 'yes' } },
      targetCondition: `deviceId = '${id}'`,
      priority: 1,
    });
    const deadline = Date.now() + 20000;
    for (;;) {
      const { responseBody: t } = await registry.getTwin(id);
      if (t.properties.desired.fromConfig === 'yes') break;
      check(Date.now() < deadline, `desired ${JSON.stringify(t.properties.desired)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    // The metrics are the reconciler's next count, which may come a moment after the content.
    let c;
    for (;;) {
      ({ responseBody: c } = await registry.getConfiguration(configId));
      if (c.systemMetrics.results.appliedCount === 1) break;
      check(Date.now() < deadline, `metrics ${JSON.stringify(c.systemMetrics)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    await registry.removeConfiguration(configId);
    return c.systemMetrics.results;
  }],
  ['Registry.delete', async () => {
    await device.close();
    await registry.delete(id);
    try { await registry.get(id); } catch (e) {
      check(e instanceof errors.DeviceNotFoundError, `typed error, got ${e.constructor.name}`);
      return 'deleted';
    }
    throw new Error('still there');
  }],
]);
