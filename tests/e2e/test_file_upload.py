"""File upload (issue 12, spec §3): a device asks the hub for an upload target over the HTTPS
device API (`get_storage_info_for_blob`), uploads with the unmodified Azure Storage client
(`azure-storage-blob`'s `BlobClient`, in one request and in blocks) to roost's embedded blob
store, then notifies the hub (`notify_blob_upload_status`); the file is then readable. At most
10 uploads per device may be in flight (403006)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import call_with_timeout, metric_sum_of, shutdown_client, unique_id


def http_client(hub, device_id: str):
    """A Python device client whose HTTPS calls go to the engine's port 443 listener (the
    connection string's GatewayHostName takes a port for HTTP)."""
    from azure.iot.device import IoTHubDeviceClient

    cs = hub.create_device(device_id) + f";GatewayHostName=localhost:{hub.ports['https']}"
    return IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=hub.ca_pem)


def blob_url(info: dict) -> str:
    # As IoT Hub's documentation has a device build it.
    return "https://{}/{}/{}{}".format(info["hostName"], info["containerName"], info["blobName"], info["sasToken"])


@pytest.mark.parametrize("blocks", [False, True], ids=["single-put", "blocks"])
def test_a_device_uploads_a_file_that_is_then_readable(shared_hub, blocks):
    from azure.storage.blob import BlobClient

    hub = shared_hub
    device_id = unique_id("uploader")
    client = http_client(hub, device_id)
    try:
        info = call_with_timeout(client.get_storage_info_for_blob, "reports/today.bin", what="storage info")
        assert info["blobName"] == f"{device_id}/reports/today.bin"
        assert info["sasToken"].startswith("?") and info["correlationId"]
        data = os.urandom(300_000)
        options = dict(max_single_put_size=64 * 1024, max_block_size=64 * 1024) if blocks else {}
        blob = BlobClient.from_blob_url(blob_url(info), connection_verify=str(hub.ca_path), **options)
        blob.upload_blob(data, overwrite=True)
        call_with_timeout(client.notify_blob_upload_status, info["correlationId"], True, 201, "uploaded",
                          what="notify")
        again = BlobClient.from_blob_url(blob_url(info), connection_verify=str(hub.ca_path))
        assert again.download_blob().readall() == data
        # The SAS names that one blob: another path with it is refused.
        other = dict(info, blobName=f"{device_id}/other.bin")
        with pytest.raises(Exception) as refused:
            BlobClient.from_blob_url(blob_url(other), connection_verify=str(hub.ca_path)).upload_blob(b"x")
        assert "AuthenticationFailed" in str(refused.value) or "403" in str(refused.value)
    finally:
        shutdown_client(client)
    # The completed upload is the hub's file_upload event, routed (by the default routes.lua)
    # to `events` with the notification as its body.
    from test_events import record_body, wait_events

    event = wait_events(hub, device_id, "fileUploadNotifications", 1)[0]
    assert event["properties"]["opType"] == "fileUploaded"
    body = json.loads(record_body(event))
    assert body["blobName"] == f"{device_id}/reports/today.bin" and body["blobSizeInBytes"] == len(data)
    m = hub.control_metrics()
    assert metric_sum_of(m, "roost_file_uploads_total", outcome="completed") >= 1
    assert metric_sum_of(m, "roost_file_upload_bytes_total") >= len(data)


def test_at_most_ten_uploads_in_flight_per_device(shared_hub):
    from azure.iot.device.exceptions import ClientError

    hub = shared_hub
    client = http_client(hub, unique_id("busy"))
    try:
        started = [call_with_timeout(client.get_storage_info_for_blob, f"f{i}", what="storage info")
                   for i in range(10)]
        with pytest.raises(ClientError) as e:
            call_with_timeout(client.get_storage_info_for_blob, "f10", what="the eleventh")
        assert "403" in str(e.value.__cause__), e.value.__cause__
        # Finishing one (even as a failure) frees its slot; an unknown correlation id is 400.
        call_with_timeout(client.notify_blob_upload_status, started[0]["correlationId"], False, 500, "gave up",
                          what="notify failure")
        call_with_timeout(client.get_storage_info_for_blob, "f11", what="a slot again")
        with pytest.raises(ClientError) as e:
            call_with_timeout(client.notify_blob_upload_status, "bm90LWFuLXVwbG9hZA==", True, 201, "",
                              what="unknown correlation")
        assert "400" in str(e.value.__cause__), e.value.__cause__
    finally:
        shutdown_client(client)


def test_the_node_sdks_upload_and_the_service_is_notified(shared_hub):
    from test_node import node_steps

    hub = shared_hub
    device_id = unique_id("nodeupload")
    steps = node_steps(hub, "file_upload.js", ROOST_DEVICE_ID=device_id, ROOST_HTTPS_PORT=str(hub.ports["https"]),
                       ROOST_AMQP_PORT=str(hub.ports["amqp"]), NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    assert len(steps) == 3, [s["step"] for s in steps]


# Azurite's well-known development account (an Azure-compatible storage account).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def test_uploads_go_to_an_azure_storage_account_instead(hub_factory, tmp_path):
    """`--blob-account-url/--blob-account-key`: the hub signs SAS tokens for an Azure Storage
    account — here Azurite, the Azure-compatible emulator, serving HTTPS with the hub's
    certificate — and asks it for the finished blob's size."""
    import subprocess
    import time

    from azure.storage.blob import BlobClient, BlobServiceClient
    from test_node import NODE_DIR
    from test_events import record_body, wait_events
    from conftest import free_port, wait_until

    hub = hub_factory()
    port = free_port()
    certs = hub.data_dir / "certs"
    azurite = subprocess.Popen(
        [str(NODE_DIR / "node_modules" / ".bin" / "azurite-blob"), "--blobHost", "127.0.0.1", "--blobPort", str(port),
         "--location", str(tmp_path / "azurite"), "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
         "--skipApiVersionCheck", "--loose", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        account_url = f"https://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        service = BlobServiceClient(account_url, credential={"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY},
                                    connection_verify=str(hub.ca_path))
        wait_until(lambda: _try(lambda: service.create_container("fileuploads")), 20, "Azurite up")
        hub.stop_control()
        hub.blob_args = ["--blob-account-url", account_url, "--blob-account-key", AZURITE_KEY]
        hub.start_control()

        device_id = unique_id("toazure")
        client = http_client(hub, device_id)
        try:
            info = wait_until(lambda: _try(lambda: client.get_storage_info_for_blob("logs/a.txt")), 20,
                              "an upload target from the restarted control")
            assert info["hostName"] == f"127.0.0.1:{port}/{AZURITE_ACCOUNT}" and info["containerName"] == "fileuploads"
            data = b"stored by Azurite\n" * 1000
            BlobClient.from_blob_url(blob_url(info), connection_verify=str(hub.ca_path)).upload_blob(data, overwrite=True)
            call_with_timeout(client.notify_blob_upload_status, info["correlationId"], True, 201, "", what="notify")
        finally:
            shutdown_client(client)
        stored = service.get_blob_client("fileuploads", f"{device_id}/logs/a.txt").download_blob().readall()
        assert stored == data
        event = wait_events(hub, device_id, "fileUploadNotifications", 1)[0]
        body = json.loads(record_body(event))
        assert body["blobSizeInBytes"] == len(data), body
        assert body["blobUri"] == f"https://127.0.0.1:{port}/{AZURITE_ACCOUNT}/fileuploads/{device_id}/logs/a.txt"
    finally:
        azurite.kill()
        azurite.wait(timeout=10)


def _try(f):
    try:
        return f() or True
    except Exception:  # noqa: BLE001 - retried until the deadline
        return None
