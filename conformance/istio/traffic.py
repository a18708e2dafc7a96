#!/usr/bin/env python3
"""Send real HTTP requests through Envoy configured by the file-config istiod.

Starts: echo upstreams on the WorkloadEntry addresses of config/10-services.yaml,
istiod (upstream profile), then
  * a router Envoy (envoy-router.yaml): requests to the Gateway listener
    127.0.0.1:18000;
  * a sidecar Envoy (envoy-sidecar.yaml with INTERCEPTION_MODE=NONE): without
    iptables, NONE makes istiod bind the outbound listeners on 127.0.0.1:<service
    port> (bind_to_port=true) instead of relying on 15001 + original-dst, so a
    plain client reaches "127.0.0.1:18080" with a Host header naming the service.
Each check prints PASS/FAIL; exit status 1 on any failure.

Usage: traffic.py [--flavour sotw|delta] [--istiod PATH] [--envoy PATH]
"""
import argparse
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # keep the checkout clean
import smoke  # noqa: E402  (helpers: free_port, http_get, parse_stats, wait_port)

UPSTREAMS = {  # name -> (addr, port); must match config/10-services.yaml
    "productpage-v1": ("127.0.0.10", 19080),
    "reviews-v1": ("127.0.0.21", 19081),
    "reviews-v2": ("127.0.0.22", 19082),
    "reviews-v3": ("127.0.0.23", 19083),
    "ratings-v1": ("127.0.0.31", 19091),
    "details-v1": ("127.0.0.41", 19101),
    "httpbin-v1": ("127.0.0.51", 19111),
    "shadow-v1": ("127.0.0.52", 19112),
}


def echo_server(name, addr, port):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_any(self):
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            body = json.dumps({"workload": name, "path": self.path, "method": self.command,
                               "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header("server-timing", "x")  # removed by the httpbin VirtualService
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_any

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((addr, port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def request(port, path, host, headers=None, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    h = {"Host": host}
    h.update(headers or {})
    c.request(method, path, headers=h)
    r = c.getresponse()
    body = r.read().decode(errors="replace")
    c.close()
    try:
        j = json.loads(body)
    except ValueError:
        j = {"raw": body}
    return r.status, {k.lower(): v for k, v in r.getheaders()}, j


def start_envoy(envoy, node, xds, flavour, work, mode=None):
    admin = smoke.free_port()
    boot = open(os.path.join(HERE, f"envoy-{node}.yaml")).read()
    boot = (boot.replace("{{XDS_PORT}}", str(xds)).replace("{{ADMIN_PORT}}", str(admin))
            .replace("{{ADS_API_TYPE}}", smoke.FLAVOURS[flavour]))
    if mode:
        boot = re.sub(r"INTERCEPTION_MODE: \w+", f"INTERCEPTION_MODE: {mode}", boot)
    path = os.path.join(work, f"{node}.yaml")
    open(path, "w").write(boot)
    p = subprocess.Popen([envoy, "-c", path, "--use-dynamic-base-id", "--concurrency", "1",
                          "-l", "warning", "--log-path", os.path.join(work, f"{node}.log")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            st = smoke.parse_stats(smoke.http_get(f"http://127.0.0.1:{admin}/stats"))
            if st.get("server.state") == 0 and st.get("listener_manager.lds.update_success", 0) > 0:
                break
        except OSError:
            pass
        time.sleep(0.3)
    time.sleep(1.5)  # RDS/EDS
    return p, admin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", default="sotw", choices=["sotw", "delta"])
    ap.add_argument("--istiod", default=os.environ.get("ISTIOD_BIN"))
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", smoke.DEFAULT_ENVOY))
    a = ap.parse_args()
    istiod = a.istiod or subprocess.check_output(
        [os.path.join(HERE, "build-istiod.sh")], text=True).strip().splitlines()[-1]
    work = tempfile.mkdtemp(prefix="legate-istio-traffic-")
    for name, (addr, port) in UPSTREAMS.items():
        echo_server(name, addr, port)

    xds, http_port = smoke.free_port(), smoke.free_port()
    env = dict(os.environ, POD_NAMESPACE="istio-system", **smoke.UPSTREAM_ENV)
    procs = []
    ist = subprocess.Popen(
        [istiod, "discovery", "--registries=", f"--configDir={os.path.join(HERE, 'config')}",
         f"--meshConfig={os.path.join(HERE, 'mesh.yaml')}", f"--grpcAddr=127.0.0.1:{xds}",
         f"--httpAddr=127.0.0.1:{http_port}", f"--monitoringAddr=127.0.0.1:{smoke.free_port()}",
         "--httpsAddr=", "--secureGRPCAddr=", f"--ctrlz_port={smoke.free_port()}"],
        env=env, stdin=subprocess.DEVNULL, stdout=open(os.path.join(work, "istiod.log"), "w"),
        stderr=subprocess.STDOUT)
    procs.append(ist)
    failures = 0

    def check(label, cond, detail):
        nonlocal failures
        print(f"{'PASS' if cond else 'FAIL'} {label}" + ("" if cond else f"  -> {detail}"))
        failures += 0 if cond else 1

    try:
        if not smoke.wait_port(xds, time.time() + 60, ist):
            sys.exit("istiod did not start")

        # ---- router (ingress gateway) ----
        p, _ = start_envoy(a.envoy, "router", xds, a.flavour, work)
        procs.append(p)
        gw = 18000
        s, h, j = request(gw, "/productpage", "bookinfo.example")
        check("gateway /productpage -> productpage-v1", s == 200 and j.get("workload") == "productpage-v1", (s, j))
        s, h, j = request(gw, "/reviews", "x", {"x-canary": "true"})
        check("gateway /reviews + x-canary -> reviews-v2", s == 200 and j.get("workload") == "reviews-v2", (s, j))
        seen = {request(gw, "/reviews", "x")[2].get("workload") for _ in range(20)}
        check("gateway /reviews weighted -> {v1,v3}", seen <= {"reviews-v1", "reviews-v3"} and seen, seen)
        s, h, j = request(gw, "/httpbin/get", "x")
        check("gateway /httpbin/get rewritten to /get + x-via-gateway", s == 200 and j.get("workload") == "httpbin-v1"
              and j.get("path") == "/get" and j.get("headers", {}).get("x-via-gateway") == "1", (s, j))
        s, h, j = request(gw, "/other", "x")
        check("gateway default -> details-v1", s == 200 and j.get("workload") == "details-v1", (s, j))
        p.send_signal(signal.SIGTERM)
        p.wait(10)

        # ---- sidecar, INTERCEPTION_MODE=NONE ----
        p, admin = start_envoy(a.envoy, "sidecar", xds, a.flavour, work, mode="NONE")
        procs.append(p)
        listeners = smoke.http_get(f"http://127.0.0.1:{admin}/listeners").split()
        print("sidecar(NONE) listeners:", " ".join(listeners))
        sc = 18080

        def svc(n):
            return f"{n}.legate.svc.cluster.local"

        s, h, j = request(sc, "/", svc("reviews"), {"end-user": "jason"})
        check("sidecar reviews end-user=jason -> v2", s == 200 and j.get("workload") == "reviews-v2", (s, j))
        s, h, j = request(sc, "/v3/x", svc("reviews"))
        check("sidecar reviews /v3/x -> v3 path /x", j.get("workload") == "reviews-v3" and j.get("path") == "/x", (s, j))
        s, h, j = request(sc, "/", svc("ratings"), {"x-fault": "abort"})
        check("sidecar ratings x-fault=abort -> 418", s == 418, (s, j))
        t0 = time.time()
        s, h, j = request(sc, "/", svc("ratings"), {"x-fault": "delay"})
        check("sidecar ratings x-fault=delay -> 200 after >=200ms", s == 200 and time.time() - t0 >= 0.19, (s, time.time() - t0))
        s, h, j = request(sc, "/teapot", svc("httpbin"))
        check("sidecar httpbin /teapot direct response 418", s == 418 and "short and stout" in j.get("raw", ""), (s, j))
        s, h, j = request(sc, "/old", svc("httpbin"))
        check("sidecar httpbin /old redirect 301 -> /new", s == 301 and h.get("location", "").endswith("/new"), (s, h))
        s, h, j = request(sc, "/API/thing", svc("httpbin"))
        check("sidecar httpbin /API/ prefix rewrite + authority", j.get("path") == "/thing"
              and j.get("headers", {}).get("host") == "httpbin.internal", (s, j))
        s, h, j = request(sc, "/anything", svc("httpbin"), {"x-remove-me": "1", "origin": "https://example.com"})
        hd = j.get("headers", {})
        check("sidecar httpbin header ops + CORS", s == 200 and hd.get("x-legate-req") == "set"
              and hd.get("x-legate-added") == "added" and "x-remove-me" not in hd
              and h.get("x-legate-resp") == "set" and "server-timing" not in h
              and h.get("access-control-allow-origin") == "https://example.com", (s, h, j))
        s, h, j = request(sc, "/", svc("details"))
        check("sidecar details -> details-v1", s == 200 and j.get("workload") == "details-v1", (s, j))
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(f"{failures} failure(s); logs in {work}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
