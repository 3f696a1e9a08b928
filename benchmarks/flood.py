#!/usr/bin/env python3
"""Raw-socket flood for profiling: one connection, pre-encoded PUBLISH frames written as one
buffer, PUBACKs counted. Usage: flood.py DATA_DIR PLAIN_PORT COUNT QOS DEVICE_ID DEVICE_KEY."""
import base64, hashlib, hmac, json, socket, struct, sys, time, urllib.parse, urllib.request
data, port, n, qos = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
hub = json.load(open(f"{data}/hub.json"))
dev, key = sys.argv[5], sys.argv[6]
host = hub["hostname"]
sr = urllib.parse.quote(f"{host}/devices/{dev}", safe="")
se = str(int(time.time()) + 3600)
sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
pw = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}"
user = f"{host}/{dev}/?api-version=2021-04-12"
def s(b): return struct.pack(">H", len(b)) + b
def rl(n):
    out = b""
    while True:
        d = n % 128; n //= 128
        out += bytes([d | (128 if n else 0)])
        if not n: return out
vh = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60)
pl = s(dev.encode()) + s(user.encode()) + s(pw.encode())
body = vh + pl
conn = bytes([0x10]) + rl(len(body)) + body
topic = f"devices/{dev}/messages/events/%24.ct=application%2Foctet-stream".encode()
payload = b"x" * 100
frames = []
for i in range(n):
    if qos:
        vb = s(topic) + struct.pack(">H", (i % 65535) + 1) + payload
        frames.append(bytes([0x32]) + rl(len(vb)) + vb)
    else:
        vb = s(topic) + payload
        frames.append(bytes([0x30]) + rl(len(vb)) + vb)
blob = b"".join(frames)
sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(conn)
ack = sock.recv(4)
assert ack[3] == 0, ack
t0 = time.time()
sock.setblocking(True)
import threading
got = [0]
def reader():
    while True:
        d = sock.recv(1 << 20)
        if not d: return
        got[0] += len(d)
th = threading.Thread(target=reader, daemon=True); th.start()
sock.sendall(blob)
t1 = time.time()
if qos:
    while got[0] < 4 * n and time.time() - t0 < 60: time.sleep(0.01)
t2 = time.time()
print(f"sent {n} in {t1-t0:.3f}s ({n/(t1-t0):.0f}/s); pubacks {got[0]//4} after {t2-t0:.3f}s ({got[0]//4/(t2-t0):.0f}/s)")
