"""The official Node SDKs, unmodified (tests/e2e/node/): the service SDK `azure-iothub`
(`Registry` create/get/update/list/delete with its typed errors, `addModule`, `getTwin` and
`updateTwin`, `addConfiguration`, `createQuery`, `Client.invokeDeviceMethod`, `JobClient` scheduling, reading, listing and cancelling jobs) and the
device SDK `azure-iot-device` with its MQTT transport (twin, reported and desired properties,
a direct method answered at QoS 0) against one hub, and the Event Hubs client `@azure/event-hubs`
reading the built-in endpoint over AMQP. Each script prints a JSON line per step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from conftest import unique_id

NODE_DIR = Path(__file__).parent / "node"


def node_steps(hub, script: str, default_service_port: bool = False, **extra: str) -> list[dict]:
    """Runs tests/e2e/node/`script` against `hub`. Its service clients go to the hub's service
    port; with `default_service_port`, to the SDK's own default (https://{HostName}, port 443),
    with only the connection string and the CA trusted through NODE_EXTRA_CA_CERTS."""
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "azure-iothub").is_dir():
        pytest.fail("the Node SDKs are not installed: run scripts/setup.sh (npm ci in tests/e2e/node)",
                    pytrace=False)
    env = {
        **os.environ,
        "ROOST_SERVICE_CS": hub.service_connection_string,
        "ROOST_CA": str(hub.ca_path),
        "ROOST_MQTT_PORT": str(hub.mqtt_port),
        **extra,
    }
    if default_service_port:
        env["NODE_EXTRA_CA_CERTS"] = str(hub.ca_path)
    else:
        env["ROOST_SERVICE_PORT"] = str(urllib.parse.urlparse(hub.service_url).port)
    cp = subprocess.run(["node", script], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120)
    steps = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    failed = [s for s in steps if not s["ok"]]
    assert cp.returncode == 0 and not failed, f"rc={cp.returncode}\n{cp.stdout}\n{cp.stderr[-3000:]}"
    return steps


def test_node_service_and_device_sdks(shared_hub):
    steps = node_steps(shared_hub, "service_and_device.js", ROOST_DEVICE_ID=unique_id("node"))
    by_name = {s["step"]: s["detail"] for s in steps}
    assert len(steps) == 14, [s["step"] for s in steps]
    assert by_name["Registry.create again is DeviceAlreadyExistsError"] == "DeviceAlreadyExistsError"
    assert by_name["Registry.get of an unknown device is DeviceNotFoundError"] == "DeviceNotFoundError"
    assert by_name["Client.invokeDeviceMethod is answered by the device"]["payload"] == {"echo": {"delay": 2}}
    assert by_name["Registry.createQuery"] == "node-1"


def test_node_event_hubs_client_reads_the_built_in_endpoint(hub):
    from azure.iot.device import Message

    from conftest import call_with_timeout

    device_id = unique_id("nodeeh")
    client = hub.connected_client(hub.create_device(device_id))
    for n in range(3):
        m = Message(json.dumps({"n": n}), content_encoding="utf-8", content_type="application/json")
        m.custom_properties["level"] = "critical"
        call_with_timeout(client.send_message, m, what="send")
    mine = [r for r in hub.records() if r["systemProperties"].get("iothub-connection-device-id") == device_id
            and r["systemProperties"]["iothub-message-source"] == "Telemetry"]
    steps = node_steps(hub, "eventhubs.js",
                       ROOST_EVENTHUBS_CS=hub.info["eventhubs_connection_string"],
                       ROOST_AMQP_PORT=str(hub.ports["amqp"]),
                       ROOST_DEVICE_ID=device_id,
                       ROOST_PARTITION=str(mine[0]["partition"]),
                       ROOST_COUNT="3",
                       NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    by_name = {s["step"]: s["detail"] for s in steps}
    assert by_name["EventHubConsumerClient.getPartitionIds"] == ["0", "1"]
    read = by_name["subscribe reads the device telemetry from the start"]
    assert read["events"] == 3
    assert read["offset"] == str(mine[0]["offset"]) and read["sequenceNumber"] == mine[0]["offset"]
