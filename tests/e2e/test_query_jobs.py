"""Queries and jobs with the official Python service SDK: `query_iot_hub` over twins and module
twins, paged with the continuation token the hub returns (absent on the last page),
projections and `GROUP BY`; `IoTHubJobManager` scheduling a twin update that reaches a
connected device's desired-properties handler and a direct method that the device answers,
`devices.jobs` with each device's outcome, cancelling a scheduled job; and the CLI's
`roost query` and `roost job` with `-o table`."""

from __future__ import annotations

import datetime
import json
import queue
import time

import pytest
from azure.iot.hub.models import CloudToDeviceMethod, JobRequest, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import call_with_timeout, device_connection_string, unique_id, wait_until
from test_methods import answer_with, wait_subscribed


def all_pages(rm, query: str, page: int):
    """Every item of a query, page by page; the pages' types and sizes."""
    items, pages, token = [], [], None
    while True:
        r = rm.query_iot_hub(QuerySpecification(query=query), token, page)
        items.extend(r.items)
        pages.append((r.type, len(r.items)))
        token = r.continuation_token
        if not token:
            return items, pages
        assert len(pages) < 100, "the continuation never ended"


def as_sent(item) -> dict:
    """An item as the hub sent it: Python reads every query item as a Twin, keeping the members
    a Twin has as attributes and the others in additional_properties."""
    return {**item.additional_properties, **item.serialize()}


def tag_devices(hub, rm, batch: str, n: int) -> list[str]:
    ids = [unique_id(f"q{i}") for i in range(n)]
    for i, d in enumerate(ids):
        hub.create_device(d)
        rm.update_twin(d, Twin(tags={"batch": batch, "n": i, "kind": "even" if i % 2 == 0 else "odd"}), "*")
    return ids


def test_query_iot_hub_pages_projects_and_groups(shared_hub):
    hub, rm = shared_hub, shared_hub.registry_manager()
    batch = unique_id("batch")
    ids = tag_devices(hub, rm, batch, 7)

    items, pages = all_pages(rm, f"SELECT * FROM devices WHERE tags.batch = '{batch}'", 3)
    assert pages == [("twin", 3), ("twin", 3), ("twin", 1)], pages
    assert sorted(t.device_id for t in items) == sorted(ids)
    assert all(t.tags["batch"] == batch for t in items)

    items, pages = all_pages(rm, f"SELECT deviceId, tags.n AS n FROM devices WHERE tags.batch = '{batch}' AND tags.n >= 5", 100)
    assert pages == [("raw", 2)]
    groups, _ = all_pages(rm, f"SELECT tags.kind AS kind, COUNT() AS n FROM devices WHERE tags.batch = '{batch}' GROUP BY tags.kind", 100)
    counts = {as_sent(g)["kind"]: as_sent(g)["n"] for g in groups}
    assert counts == {"even": 4, "odd": 3}, groups

    with pytest.raises(HttpOperationError) as err:
        rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices WHERE"))
    assert err.value.response.status_code == 400
    assert "expected a value" in err.value.response.text

    table = hub.cli("query", f"SELECT deviceId, tags.n FROM devices WHERE tags.batch = '{batch}'", "-o", "table").stdout
    lines = table.splitlines()
    assert lines[0].split() == ["deviceId", "n"], table
    assert len(lines) == 8 and all(any(d in line for line in lines) for d in ids), table
    assert json.loads(hub.cli("query", f"SELECT COUNT() AS n FROM devices WHERE tags.batch = '{batch}'").stdout) == [{"n": 7}]


def test_module_twins_are_queried(shared_hub):
    hub, rm = shared_hub, shared_hub.registry_manager()
    device_id = unique_id("qmod")
    hub.create_device(device_id)
    hub.cli("module", "create", device_id, "sensor")
    hub.cli("module", "create", device_id, "camera")
    items, _ = all_pages(rm, f"SELECT * FROM devices.modules WHERE devices.deviceId = '{device_id}'", 100)
    assert sorted(t.module_id for t in items) == ["camera", "sensor"]
    listed = json.loads(hub.cli("module", "list", device_id).stdout)
    assert sorted(m["moduleId"] for m in listed) == ["camera", "sensor"]
    hub.cli("module", "delete", device_id, "camera")
    items, _ = all_pages(rm, f"SELECT * FROM devices.modules WHERE deviceId = '{device_id}'", 100)
    assert [t.module_id for t in items] == ["sensor"]


def wait_job(jm, job_id: str, timeout: float = 30.0):
    return wait_until(lambda: (j := jm.get_scheduled_job(job_id)).status in ("completed", "failed") and j,
                      timeout, f"job {job_id} to finish")


def test_job_manager_updates_twins_and_calls_methods(shared_hub):
    hub, rm, jm = shared_hub, shared_hub.registry_manager(), shared_hub.job_manager()
    batch = unique_id("jobs")
    ids = tag_devices(hub, rm, batch, 3)
    client = hub.connected_client(_conn(hub, ids[0]))
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    seen = answer_with(client)
    wait_subscribed(hub, rm, ids[0])
    now = datetime.datetime.now(datetime.timezone.utc)

    twin_job = unique_id("twinjob")
    req = JobRequest(job_id=twin_job, type="scheduleUpdateTwin", start_time=now,
                     max_execution_time_in_seconds=60, query_condition=f"tags.batch = '{batch}'",
                     update_twin=Twin(etag="*", properties=TwinProperties(desired={"fw": "2.0"})))
    created = jm.create_scheduled_job(twin_job, req)
    assert created.job_id == twin_job and created.status in ("queued", "running", "completed")
    patch = patches.get(timeout=30)
    assert patch["fw"] == "2.0", patch
    done = wait_job(jm, twin_job)
    assert done.status == "completed"
    stats = done.device_job_statistics
    assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (3, 3, 0)
    assert all(rm.get_twin(d).properties.desired["fw"] == "2.0" for d in ids)

    method_job = unique_id("methodjob")
    req = JobRequest(job_id=method_job, type="scheduleDeviceMethod", start_time=now,
                     max_execution_time_in_seconds=60, query_condition=f"deviceId IN ['{ids[0]}', '{ids[1]}']",
                     cloud_to_device_method=CloudToDeviceMethod(method_name="reboot", payload={"delay": 1},
                                                                response_timeout_in_seconds=10))
    jm.create_scheduled_job(method_job, req)
    done = wait_job(jm, method_job)
    stats = done.device_job_statistics
    assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (2, 1, 1), stats
    assert ("reboot", {"delay": 1}) in seen
    records, _ = all_pages(rm, f"SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{method_job}'", 100)
    by_device = {r.device_id: as_sent(r) for r in records}
    assert by_device[ids[0]]["status"] == "completed"
    assert by_device[ids[0]]["outcome"]["deviceMethodResponse"]["status"] == 200
    assert by_device[ids[1]]["status"] == "failed", "that device is not connected"

    later = now + datetime.timedelta(hours=1)
    scheduled = unique_id("later")
    jm.create_scheduled_job(scheduled, JobRequest(job_id=scheduled, type="scheduleUpdateTwin", start_time=later,
                                                  max_execution_time_in_seconds=60, query_condition="*",
                                                  update_twin=Twin(tags={"never": True})))
    assert jm.get_scheduled_job(scheduled).status == "scheduled"
    assert jm.cancel_scheduled_job(scheduled).status == "cancelled"
    with pytest.raises(HttpOperationError) as err:
        jm.get_scheduled_job(unique_id("nojob"))
    assert err.value.response.status_code == 404

    listed = json.loads(hub.cli("job", "list", "--status", "cancelled").stdout)
    assert scheduled in [j["jobId"] for j in listed]
    table = hub.cli("job", "show", twin_job, "-o", "table").stdout
    assert "deviceJobStatistics.succeededCount" in table and "completed" in table, table


def _conn(hub, device_id: str) -> str:
    """The connection string of an existing device, from its primary key."""
    key = hub.show_device(device_id)["authentication"]["symmetricKey"]["primaryKey"]
    return device_connection_string(hub.hostname, device_id, key)


def test_a_job_resumes_after_control_is_killed(hub):
    """A twin-update job over 120 devices (about 2.4 s at the jobs' 50 device operations per
    second); control is SIGKILLed while it runs and started again: the job finishes from its
    last checkpoint, every device updated and counted once."""
    import requests

    n = 120
    for start in range(0, n, 100):
        # IoT Hub takes import modes in any case.
        mode = "Create" if start == 0 else "CREATE"
        batch = [{"id": f"r{i:03}", "importMode": mode, "authentication": {"type": "sas", "symmetricKey": {}}}
                 for i in range(start, min(n, start + 100))]
        r = requests.post(f"{hub.service_url}/devices?api-version=2021-04-12", json=batch,
                          headers=hub.service_headers(), verify=str(hub.ca_path), timeout=15)
        assert r.status_code == 200 and r.json()["isSuccessful"], r.text
    jm = hub.job_manager()
    req = JobRequest(job_id="resume", type="scheduleUpdateTwin",
                     start_time=datetime.datetime.now(datetime.timezone.utc),
                     max_execution_time_in_seconds=120, query_condition="*",
                     update_twin=Twin(properties=TwinProperties(desired={"v": 1})))
    jm.create_scheduled_job("resume", req)
    wait_until(lambda: 0 < jm.get_scheduled_job("resume").device_job_statistics.succeeded_count < n, 20,
               "the job to be part way", interval=0.05)
    hub.kill_control()
    hub.start_control()
    jm = hub.job_manager()
    done = wait_job(jm, "resume", timeout=60)
    assert done.status == "completed", done
    stats = done.device_job_statistics
    assert (stats.device_count, stats.succeeded_count, stats.failed_count, stats.pending_count) == (n, n, 0, 0)
    rm = hub.registry_manager()
    items, _ = all_pages(rm, "SELECT COUNT() AS n FROM devices WHERE properties.desired.v = 1", 10)
    assert as_sent(items[0])["n"] == n
    records, _ = all_pages(rm, "SELECT * FROM devices.jobs WHERE jobId = 'resume'", 1000)
    assert len(records) == n


def test_configuration_manager_sets_desired_properties(shared_hub):
    """Automatic device management with `IoTHubConfigurationManager`: a configuration over a
    tag reaches a connected device's desired-properties handler; a higher priority one wins
    where both match; the system and custom metrics count the twins; a device tagged later is
    targeted too; deleting the winner lets the other apply."""
    from azure.iot.hub.models import Configuration, ConfigurationContent, ConfigurationMetrics, ConfigurationQueriesTestInput

    hub, rm, cm = shared_hub, shared_hub.registry_manager(), shared_hub.configuration_manager()
    batch = unique_id("adm")
    ids = tag_devices(hub, rm, batch, 3)
    client = hub.connected_client(_conn(hub, ids[0]))
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put

    def config(cid: str, condition: str, priority: int, fw: str) -> Configuration:
        return Configuration(
            id=cid, schema_version="1.0", priority=priority, target_condition=condition, labels={"batch": batch},
            content=ConfigurationContent(device_content={"properties.desired.fw": {"version": fw}}),
            metrics=ConfigurationMetrics(queries={
                "reportedOk": f"SELECT deviceId FROM devices WHERE configurations.[[{cid}]].status = 'Applied' AND properties.reported.ok = true"}))

    base, even = f"{batch}-base", f"{batch}-even"
    created = cm.create_configuration(config(base, f"tags.batch = '{batch}'", 1, "1.0"))
    assert created.id == base and created.etag
    cm.create_configuration(config(even, f"tags.batch = '{batch}' AND tags.kind = 'even'", 5, "2.0"))

    def fw(d):
        return rm.get_twin(d).properties.desired.get("fw", {}).get("version")

    wait_until(lambda: [fw(d) for d in ids] == ["2.0", "1.0", "2.0"], 20, "configurations applied")
    # The device hears of it as a desired patch (first base's, if the reconciler ran between
    # the two creations, then the winner's).
    seen = [patches.get(timeout=20)]
    while seen[-1]["fw"] != {"version": "2.0"}:
        seen.append(patches.get(timeout=20))
    assert len(seen) <= 2, seen
    call_with_timeout(client.patch_twin_reported_properties, {"ok": True}, what="report")
    c = cm.get_configuration(even)
    assert c.system_metrics.results == {"targetedCount": 2, "appliedCount": 2}, c.system_metrics.results
    assert c.metrics.results == {"reportedOk": 1}, c.metrics.results
    assert cm.get_configuration(base).system_metrics.results == {"targetedCount": 3, "appliedCount": 1}
    assert {x.id for x in cm.get_configurations(100)} >= {base, even}

    late = unique_id("late")
    hub.create_device(late)
    rm.update_twin(late, Twin(tags={"batch": batch}), "*")
    wait_until(lambda: fw(late) == "1.0", 20, "a device tagged later gets the configuration")

    cm.delete_configuration(even)
    wait_until(lambda: fw(ids[0]) == "1.0", 20, "the other configuration applies once the winner is gone")
    result = cm.test_configuration_queries(ConfigurationQueriesTestInput(
        target_condition="tags.x = ", custom_metric_queries={"ok": "SELECT deviceId FROM devices"}))
    assert result.target_condition_error and result.custom_metric_query_errors == {"ok": ""}
    with pytest.raises(HttpOperationError) as err:
        cm.create_configuration(config(base, "*", 1, "9"))
    assert err.value.response.status_code == 409
    cm.delete_configuration(base)
