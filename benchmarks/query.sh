#!/usr/bin/env bash
# Twin queries over 100,000 devices (issue 8 §7): registers N devices with bulk imports, tags
# every 100th one site=oslo (the rest have no tags), then times each query of QUERIES below
# over REST (`POST /devices/query`, pages of 1,000, every page fetched), 5 runs each, and prints
# the median and the fastest wall time per whole result, with control's RSS after the runs.
# Figures go in docs/benchmarks.md ("Queries and jobs").
#
#   benchmarks/query.sh ROOST_BIN [DEVICES]
#
# Listens on 127.0.0.1 ports 38883, 38443, 39464, 39465, 38472; everything started is stopped
# on exit. Needs the repository's .venv (scripts/setup.sh) for `requests`.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
R=$1 N=${2:-100000}
D=$(mktemp -d /tmp/roost-query.XXXXXX)
"$R" up --data-dir "$D/hub" --mqtt 127.0.0.1:38883 --service 127.0.0.1:38443 \
  --ops 127.0.0.1:39464 --control-ops 127.0.0.1:39465 --link 127.0.0.1:38472 --cores 1 >"$D/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 1 300); do grep -q "roost is up" "$D/up.log" && break; sleep 0.2; done
grep -q "roost is up" "$D/up.log" || { cat "$D/up.log"; exit 1; }
C=$(pgrep -f "control --data-dir $D/hub" | head -1)
"$REPO/.venv/bin/python" - "$D/hub" "$N" "$C" <<'PY'
import base64, hashlib, hmac, json, statistics, sys, time, urllib.parse
from concurrent.futures import ThreadPoolExecutor
import requests

hub_dir, n, control_pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hub = json.load(open(f"{hub_dir}/hub.json"))
cs = dict(p.split("=", 1) for p in hub["service_connection_string"].split(";"))
host, policy, key = cs["HostName"], cs["SharedAccessKeyName"], cs["SharedAccessKey"]

def token():
    sr = urllib.parse.quote(host, safe="")
    se = str(int(time.time()) + 3600)
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest())
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}&skn={policy}"

url, ca = hub["service_url"], hub["ca"]
s = requests.Session()
s.trust_env = False  # REQUESTS_CA_BUNDLE would override the hub's CA
s.verify = ca
s.headers.update({"Authorization": token(), "Content-Type": "application/json"})
t0 = time.monotonic()
for start in range(0, n, 100):
    batch = [{"id": f"d{i:06}", "importMode": "create", "authentication": {"type": "sas", "symmetricKey": {}}}
             for i in range(start, min(n, start + 100))]
    r = s.post(f"{url}/devices?api-version=2021-04-12", json=batch, timeout=60)
    assert r.status_code == 200 and r.json()["isSuccessful"], r.text[:300]
created = time.monotonic() - t0

def tag(i):
    with requests.Session() as t:
        t.trust_env = False
        t.verify = ca
        t.headers.update(s.headers)
        for j in range(i, n, 400):
            r = t.patch(f"{url}/twins/d{j:06}?api-version=2021-04-12", json={"tags": {"site": "oslo", "n": j}}, timeout=60)
            assert r.status_code == 200, r.text[:300]

with ThreadPoolExecutor(4) as pool:
    list(pool.map(tag, range(0, 400, 100)))
print(f"{n} devices registered in {created:.1f} s (bulk, 100 per request); {n // 100} tagged site=oslo")

QUERIES = [
    ("count, full scan", "SELECT COUNT() AS n FROM devices"),
    ("group by tag, full scan", "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site"),
    ("tag filter, full scan, 1% match", "SELECT * FROM devices WHERE tags.site = 'oslo'"),
    ("identity filter, full scan, 0 match", "SELECT deviceId FROM devices WHERE status = 'disabled'"),
    ("deviceId IN, primary key", "SELECT * FROM devices WHERE deviceId IN ['d000042', 'd050000', 'd099999']"),
    ("first page only, SELECT *", None),
]

def run(q):
    items, token_, pages = 0, None, 0
    while True:
        h = {"x-ms-max-item-count": "1000"}
        if token_:
            h["x-ms-continuation"] = token_
        r = s.post(f"{url}/devices/query?api-version=2021-04-12", json={"query": q}, headers=h, timeout=120)
        assert r.status_code == 200, r.text[:300]
        items += len(r.json())
        pages += 1
        token_ = r.headers.get("x-ms-continuation")
        if not token_:
            return items, pages

for name, q in QUERIES:
    times = []
    for _ in range(5):
        t = time.monotonic()
        if q is None:
            r = s.post(f"{url}/devices/query?api-version=2021-04-12", json={"query": "SELECT * FROM devices"},
                       headers={"x-ms-max-item-count": "100"}, timeout=60)
            assert r.status_code == 200
            items, pages = len(r.json()), 1
        else:
            items, pages = run(q)
        times.append(time.monotonic() - t)
    print(f"{name:40} {items:7} items {pages:4} pages  median {statistics.median(times)*1000:8.1f} ms  best {min(times)*1000:8.1f} ms")
rss = [l for l in open(f"/proc/{control_pid}/status") if l.startswith("VmRSS")][0].split()[1]
print(f"control RSS after the runs: {int(rss) / 1024:.0f} MiB")
PY
