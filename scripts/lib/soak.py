#!/usr/bin/python3
"""The load, the connector restarts, the samples, the plot and the verdict of scripts/soak.sh.

Kinds of traffic, each from --workers threads in a loop, each request on a new connection (so
connection setup and teardown are soaked too):
  http   GET through the HTTP proxy (the small page, every 4th the 256 KiB file)
  socks  SOCKS5 with SAP's method 0x80 to the TCP mapping, one HTTP/1.0 exchange over it
  find   GET /destination-configuration/v1/destinations/soak on the Destination Service
A failure while the connector restarts (from the kill until it is connected again, plus a grace
of two seconds) counts as a restart error; any other failure is an error.
"""
import argparse
import base64
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

KINDS = ("http", "socks", "find")


def token(creds):
    body = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": creds["clientid"], "client_secret": creds["clientsecret"]}
    ).encode()
    with urllib.request.urlopen(creds["url"] + "/oauth/token", body, timeout=30) as r:
        return json.load(r)["access_token"]


def read_all(s):
    out = bytearray()
    while True:
        b = s.recv(65536)
        if not b:
            return bytes(out)
        out += b


def status_of(resp):
    line = resp.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 else 0


class Tokens:
    """Client-credentials tokens, fetched again before they expire."""

    def __init__(self, creds):
        self.creds, self.value, self.at, self.lock = creds, None, 0.0, threading.Lock()

    def get(self):
        with self.lock:
            if self.value is None or time.time() - self.at > 300:
                self.value, self.at = token(self.creds), time.time()
            return self.value


def http_once(proxy_port, tok, n):
    path = "/api/big.bin" if n % 4 == 0 else "/api/small.json"
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(
            f"GET http://soak.virtual:80{path} HTTP/1.1\r\nHost: soak.virtual\r\nProxy-Authorization: Bearer {tok}\r\n"
            f"SAP-Connectivity-SCC-Location_ID: soak\r\nConnection: close\r\n\r\n".encode()
        )
        resp = read_all(s)
    return status_of(resp) == 200 and (path != "/api/big.bin" or len(resp) > 262144)


def socks_once(socks_port, tok, n):
    with socket.create_connection(("127.0.0.1", socks_port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"\x05\x01\x80")
        if s.recv(2) != b"\x05\x80":
            return False
        t, loc = tok.encode(), base64.b64encode(b"soak")
        s.sendall(b"\x01" + len(t).to_bytes(4, "big") + t + bytes([len(loc)]) + loc)
        if s.recv(2) != b"\x01\x00":
            return False
        host = b"soak-tcp.virtual"
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + (80).to_bytes(2, "big"))
        reply = s.recv(4)
        if len(reply) < 2 or reply[1] != 0:
            return False
        rest = {1: 4 + 2, 4: 16 + 2}.get(reply[3], None) if len(reply) == 4 else None
        if rest is None:
            return False
        s.recv(rest)
        s.sendall(b"GET /api/small.json HTTP/1.0\r\nHost: soak\r\n\r\n")
        return status_of(read_all(s)) == 200


def find_once(dest_uri, tok, n):
    req = urllib.request.Request(
        dest_uri + "/destination-configuration/v1/destinations/soak", headers={"Authorization": "Bearer " + tok}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status == 200 and json.load(r)["destinationConfiguration"]["Name"] == "soak"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()
        self.total = {k: [0, 0, 0] for k in KINDS}  # requests, errors, restart errors

    def reset(self):
        self.lat = {k: [] for k in KINDS}
        self.count = {k: [0, 0, 0] for k in KINDS}

    def add(self, kind, seconds, ok, restarting):
        with self.lock:
            self.lat[kind].append(seconds)
            c = 0 if ok else (2 if restarting else 1)
            for d in (self.count[kind], self.total[kind]):
                d[0] += 1
                if not ok:
                    d[c] += 1

    def take(self):
        with self.lock:
            lat, count = self.lat, self.count
            self.reset()
            return lat, count


def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def pct(values, p):
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


class Connector:
    def __init__(self, ferry, config, out):
        self.ferry, self.config, self.out = ferry, config, out
        self.proc, self.restarting_until, self.restarts = None, 0.0, 0

    def start(self):
        env = dict(os.environ, FERRY_LOG="warn")
        self.proc = subprocess.Popen(
            [self.ferry, "connector", "run", "--config", self.config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

        # stderr to the log; its first "tunnels connected: 1" ends the restart.
        def drain_err(p):
            with open(os.path.join(self.out, "connector.log"), "ab") as log:
                for line in p.stderr:
                    log.write(line)
                    log.flush()
                    if line.strip() == b"tunnels connected: 1":
                        self.restarting_until = min(self.restarting_until, time.time() + 2)

        threading.Thread(target=drain_err, args=(self.proc,), daemon=True).start()
        for line in self.proc.stdout:
            if line.strip() == b"ready":
                break
        threading.Thread(target=lambda p: [None for _ in p.stdout], args=(self.proc,), daemon=True).start()

    def restart(self):
        self.restarting_until = float("inf")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.restarts += 1
        self.start()

    def restarting(self):
        return time.time() < self.restarting_until

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def flat(series, pct_limit, abs_slack=0):
    """Median of the last third vs the first third, after a warm-up of a sixth of the run."""
    n = len(series)
    body = series[n // 6 :]
    if len(body) < 6:
        return True, 0, 0, 0.0
    third = len(body) // 3
    first, last = statistics.median(body[:third]), statistics.median(body[-third:])
    change = (last - first) / first * 100 if first else 0.0
    ok = last <= first * (1 + pct_limit / 100) or last - first <= abs_slack
    return ok, first, last, change


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--up-pid", type=int, required=True)
    ap.add_argument("--connector-config", required=True)
    ap.add_argument("--env-file", required=True)
    ap.add_argument("--restart-every", type=float, default=60)
    ap.add_argument("--sample", type=float, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--flat-pct", type=float, default=10)
    a = ap.parse_args()

    vcap = json.load(open(a.env_file))["VCAP_SERVICES"]
    conn, dest = vcap["connectivity"][0]["credentials"], vcap["destination"][0]["credentials"]
    proxy_port, socks_port = int(conn["onpremise_proxy_http_port"]), int(conn["onpremise_socks5_proxy_port"])
    proxy_tokens, dest_tokens = Tokens(conn), Tokens(dest)

    connector = Connector(a.ferry, a.connector_config, a.out)
    connector.start()
    connector.restarting_until = float("inf")
    # Wait for the first tunnel before the clock starts.
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if http_once(proxy_port, proxy_tokens.get(), 1):
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        sys.exit("the connector did not connect within 60 s")
    connector.restarting_until = 0.0

    stats, stop = Stats(), threading.Event()
    calls = {
        "http": lambda n: http_once(proxy_port, proxy_tokens.get(), n),
        "socks": lambda n: socks_once(socks_port, proxy_tokens.get(), n),
        "find": lambda n: find_once(dest["uri"], dest_tokens.get(), n),
    }
    failures = []

    def worker(kind):
        n = 0
        while not stop.is_set():
            n += 1
            restarting = connector.restarting()
            t0 = time.perf_counter()
            try:
                ok = calls[kind](n)
                why = "unexpected answer"
            except Exception as e:  # noqa: BLE001 - every failure is counted
                ok, why = False, f"{type(e).__name__}: {e}"
            elapsed = time.perf_counter() - t0
            restarting = restarting or connector.restarting()
            stats.add(kind, elapsed, ok, restarting)
            if not ok and not restarting and len(failures) < 50:
                failures.append(f"{time.strftime('%H:%M:%S')} {kind}: {why}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in KINDS for _ in range(a.workers)]
    for t in threads:
        t.start()

    rows = []
    csv_path = os.path.join(a.out, "soak.csv")
    fields = ["t"] + [f"{k}_{m}" for k in KINDS for m in ("requests", "errors", "restart_errors", "p50_ms", "p99_ms")]
    fields += ["up_rss_kib", "up_fds", "connector_rss_kib", "connector_fds", "connector_restarts"]
    start = time.time()
    end = start + a.minutes * 60
    next_restart = start + a.restart_every
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        next_sample = start + a.sample
        while time.time() < end:
            now = time.time()
            if now >= next_restart:
                connector.restart()
                next_restart = time.time() + a.restart_every
            time.sleep(max(0.0, min(next_sample, next_restart, end) - time.time()))
            if time.time() < next_sample:
                continue
            next_sample += a.sample
            lat, count = stats.take()
            row = {"t": round(time.time() - start, 1)}
            for k in KINDS:
                row[f"{k}_requests"], row[f"{k}_errors"], row[f"{k}_restart_errors"] = count[k]
                row[f"{k}_p50_ms"] = round(pct(lat[k], 50) * 1000, 2)
                row[f"{k}_p99_ms"] = round(pct(lat[k], 99) * 1000, 2)
            cpid = connector.proc.pid
            row.update(
                up_rss_kib=proc_rss_kib(a.up_pid),
                up_fds=proc_fds(a.up_pid),
                connector_rss_kib=proc_rss_kib(cpid),
                connector_fds=proc_fds(cpid),
                connector_restarts=connector.restarts,
            )
            w.writerow(row)
            f.flush()
            rows.append(row)
    stop.set()
    for t in threads:
        t.join(60)
    connector.stop()

    plot(rows, a.png)
    total = stats.total
    print(f"samples: {len(rows)} every {a.sample:g} s over {a.minutes:g} min; connector restarts: {connector.restarts}")
    for k in KINDS:
        p99s = [r[f"{k}_p99_ms"] for r in rows if r[f"{k}_requests"]]
        print(
            f"{k:6} requests {total[k][0]:8}  errors {total[k][1]:5}  during restarts {total[k][2]:5}  "
            f"p99 median {statistics.median(p99s) if p99s else 0:.1f} ms  max {max(p99s) if p99s else 0:.1f} ms"
        )
    verdict = True
    for name, key, limit, slack in (
        ("ferry up RSS", "up_rss_kib", a.flat_pct, 0),
        ("ferry up fds", "up_fds", 10, 5),
        # The connector restarts: its RSS and fds are per process life, compared the same way.
        ("connector RSS", "connector_rss_kib", a.flat_pct, 0),
        ("connector fds", "connector_fds", 10, 5),
    ):
        ok, first, last, change = flat([r[key] for r in rows], limit, slack)
        verdict &= ok
        print(f"{name:14} first third median {first:>8}  last third median {last:>8}  ({change:+.1f} %)  {'flat' if ok else 'GROWING'}")
    errors = sum(total[k][1] for k in KINDS)
    if failures:
        print("errors outside restarts (first 50):")
        for line in failures:
            print("  " + line)
    print(f"csv: {csv_path}\npng: {a.png}")
    print("verdict: " + ("flat, no errors outside restarts" if verdict and errors == 0 else "NOT OK"))
    sys.exit(0 if verdict and errors == 0 else 1)


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] / 60 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    for i, k in enumerate(KINDS):
        c = f"C{i}"
        ax[0].plot(t, [r[f"{k}_p99_ms"] for r in rows], c, label=f"{k} p99")
        ax[1].plot(t, [r[f"{k}_requests"] for r in rows], c, label=f"{k} requests")
        ax[1].plot(t, [r[f"{k}_errors"] + r[f"{k}_restart_errors"] for r in rows], c, linestyle=":", label=f"{k} errors")
    ax[0].set_ylabel("p99 latency (ms)")
    ax[0].set_yscale("log")
    ax[1].set_ylabel("per sample")
    ax[2].plot(t, [r["up_rss_kib"] / 1024 for r in rows], label="ferry up")
    ax[2].plot(t, [r["connector_rss_kib"] / 1024 for r in rows], label="connector")
    ax[2].set_ylabel("RSS (MiB)")
    ax[3].plot(t, [r["up_fds"] for r in rows], label="ferry up")
    ax[3].plot(t, [r["connector_fds"] for r in rows], label="connector")
    ax[3].set_ylabel("open fds")
    ax[3].set_xlabel("minutes")
    restarts = [r["t"] / 60 for i, r in enumerate(rows) if i and r["connector_restarts"] != rows[i - 1]["connector_restarts"]]
    for a in ax:
        for x in restarts:
            a.axvline(x, color="grey", alpha=0.3, linewidth=0.8)
        a.legend(loc="upper left", fontsize=8)
        a.grid(alpha=0.3)
    ax[0].set_title("Ferry soak: mixed traffic, connector restarts (grey lines)")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main()
