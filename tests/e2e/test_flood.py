"""One device flooding faster than its shard can read must not take the shard over.

glommio is cooperative: a connection whose socket never runs dry would, without yielding,
keep its shard to itself until the log's backpressure (16 MiB open) stopped it — the committer
would then sync one 16 MiB batch at a time, every device on the shard waiting that long for
its PUBACK, and the shard's 100 ms tick (metrics, kicks) would run only in those pauses. A
debug engine reads far slower than roost-bench writes, so its socket stays full for the whole
flood.
"""

import subprocess
import time

FLOOD_SECS = 6


def test_log_keeps_committing_while_one_connection_floods(hub, bench_binary, tmp_path):
    log_path = tmp_path / "bench.log"
    with open(log_path, "wb") as log:
        bench = subprocess.Popen(
            [str(bench_binary), "--target", "roost", "--hub", str(hub.data_dir), "--tls",
             "--connections", "1", "--prefix", "flood-", "--qos", "0", "--payload", "100",
             "--rate", "0", "--duration", str(FLOOD_SECS), "--warmup", "0", "--no-readback"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            # Wait for the flood to start, then sample the shard's counters through it.
            hub.wait_metric("roost_messages_in_total", lambda v: v > 0, "> 0 once the flood starts",
                            timeout=30, protocol="mqtt")
            samples = []
            end = time.monotonic() + FLOOD_SECS - 2
            while time.monotonic() < end and bench.poll() is None:
                samples.append((hub.metric_sum("roost_log_commits_total"),
                                hub.metric_sum("roost_messages_in_total", protocol="mqtt")))
                time.sleep(0.5)
            rc = bench.wait(timeout=120)
        finally:
            if bench.poll() is None:
                bench.kill()
    output = log_path.read_text(errors="replace")
    assert rc == 0, f"roost-bench exited {rc}:\n{output[-3000:]}"
    assert len(samples) >= 4, f"flood ended too early to observe ({len(samples)} samples):\n{output[-3000:]}"
    # Every half second of the flood, the log committed and the shard's counters moved on.
    stalls = [i for i in range(1, len(samples))
              if samples[i][0] <= samples[i - 1][0] or samples[i][1] <= samples[i - 1][1]]
    assert not stalls, f"no commit or no counter flush between samples {stalls}: {samples}"
    # And it committed what was there as it came, not a backpressure-sized batch at a time
    # (16 MiB is about 50,000 of these records; a yielding connection leaves a few hundred).
    for (c0, m0), (c1, m1) in zip(samples, samples[1:]):
        assert (m1 - m0) / (c1 - c0) < 10_000, (
            f"{m1 - m0:.0f} messages in {c1 - c0:.0f} commits in half a second of the flood: the "
            f"committer only ran when the flooding connection hit the log's backpressure: {samples}")
    # And the engine really was behind: it was still reading when the publisher stopped.
    in_at_end = samples[-1][1]
    final = hub.wait_metric("roost_messages_in_total", lambda v: v > in_at_end,
                            "to keep growing after the last sample (the socket was full)",
                            timeout=30, protocol="mqtt")
    print(f"samples (commits, messages in): {samples}; final messages in {final}")
