"""The official Node SDKs, unmodified (tests/e2e/node/): the service SDK `azure-iothub`
(`Registry` create/get/update/list/delete with its typed errors, `addModule`, `getTwin` and
`updateTwin`, `addConfiguration`, `createQuery`, `Client.invokeDeviceMethod`, `JobClient` scheduling, reading, listing and cancelling jobs) and the
device SDK `azure-iot-device` with its MQTT transport (twin, reported and desired properties,
a direct method answered at QoS 0) against one hub. The script prints a JSON line per step."""

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


def node_steps(hub, script: str, **extra: str) -> list[dict]:
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "azure-iothub").is_dir():
        pytest.fail("the Node SDKs are not installed: run scripts/setup.sh (npm ci in tests/e2e/node)",
                    pytrace=False)
    env = {
        **os.environ,
        "ROOST_SERVICE_CS": hub.service_connection_string,
        "ROOST_SERVICE_PORT": str(urllib.parse.urlparse(hub.service_url).port),
        "ROOST_CA": str(hub.ca_path),
        "ROOST_MQTT_PORT": str(hub.mqtt_port),
        **extra,
    }
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
