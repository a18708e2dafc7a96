#!/usr/bin/env python3
"""Run the file-config istiod and check that Envoy ACKs everything it sends.

For every node type (sidecar, router) and xDS flavour (SotW = GRPC,
Delta = DELTA_GRPC) this starts one Envoy from envoy-<node>.yaml, waits for
it to go LIVE, then reads its admin /stats and saves
  <out>/<node>-<flavour>.json         /config_dump?include_eds
                                      (default profile: <node>-default[-delta].json)
  <out>/<node>-<flavour>.stats.txt    /stats (xDS-related lines)
  <out>/<node>-<flavour>.syncz.json   istiod's /debug/syncz (sent vs acked)
  <out>/<node>-<flavour>.envoy.log    Envoy's log
and fails if any CDS/LDS/RDS/EDS update was rejected.

Profiles:
  upstream (default): PILOT_ENABLE_METADATA_EXCHANGE=false,
      PILOT_ENABLE_ALPN_FILTER=false, mesh.yaml (no default metrics provider).
  default: no env overrides and defaultProviders.metrics=[prometheus] as in
      Istio's Helm chart; istiod then sends istio-proxy-only extensions.
      Rejections are reported (exit status 0 unless --strict).

Usage: smoke.py [--profile upstream|default] [--nodes sidecar,router]
                [--flavours sotw,delta] [--out DIR] [--istiod PATH] [--envoy PATH]
Env: ENVOY_BIN, ISTIOD_BIN override the binaries.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_ENVOY = os.path.join(
    REPO, "target/conformance/venv/lib/python3.11/site-packages/envoy/_bin/envoy")
FLAVOURS = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
UPSTREAM_ENV = {"PILOT_ENABLE_METADATA_EXCHANGE": "false",
                "PILOT_ENABLE_ALPN_FILTER": "false"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_port(port, deadline, proc):
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def parse_stats(text):
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(": ")
        if sep and v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


NODE_IDS = {"sidecar": "productpage-v1-0.legate", "router": "istio-ingressgateway-0.istio-system"}


def envoy_config_dump(admin):
    """/config_dump?include_eds; if Envoy cannot render it (it fails as a whole
    when a rejected resource in error_state holds an Any of a type it does
    not know, e.g. Istio's stats.PluginConfig), fall back to one section at
    a time and record what failed."""
    base = f"http://127.0.0.1:{admin}/config_dump"
    text = http_get(base + "?include_eds", timeout=15)
    try:
        json.loads(text)
        return text
    except ValueError:
        pass
    configs, errors = [], {}
    for res in ("dynamic_active_clusters", "dynamic_warming_clusters", "dynamic_listeners",
                "dynamic_route_configs", "dynamic_endpoint_configs"):
        try:
            t = http_get(f"{base}?include_eds&resource={res}", timeout=15)
        except urllib.error.HTTPError as e:  # 404: no such resources
            t = e.read().decode(errors="replace")
            if e.code == 404:
                continue
        try:
            configs.extend(json.loads(t).get("configs", []))
        except ValueError:
            errors[res] = t.strip()[:500]
    return json.dumps({"configs": configs, "legate_dump_errors": errors,
                       "legate_note": "per-resource fallback: full /config_dump failed: " + text.strip()[:300]},
                      indent=1)


def xds_summary(st):
    """Aggregate subscription counters per xDS type."""
    agg = {t: {"success": 0, "rejected": 0, "failure": 0, "n": 0}
           for t in ("cds", "lds", "rds", "eds")}

    def add(t, k, v):
        for f in ("success", "rejected", "failure"):
            if k.endswith(".update_" + f):
                agg[t][f] += v
                if f == "success":
                    agg[t]["n"] += 1

    for k, v in st.items():
        if k.startswith("cluster_manager.cds."):
            add("cds", k, v)
        elif k.startswith("listener_manager.lds."):
            add("lds", k, v)
        elif re.match(r"^http\..*\.rds\.", k):
            add("rds", k, v)
        elif k.startswith("cluster.") and re.search(r"\.update_(success|rejected|failure)$", k):
            # per-cluster EDS subscription counters (only EDS clusters have them)
            add("eds", k, v)
    return agg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="upstream", choices=["upstream", "default"])
    ap.add_argument("--nodes", default="sidecar,router")
    ap.add_argument("--flavours", default="sotw,delta")
    ap.add_argument("--out", default="/tmp/istio-dumps")
    ap.add_argument("--istiod", default=os.environ.get("ISTIOD_BIN"))
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", DEFAULT_ENVOY))
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait after LIVE for RDS/EDS to settle")
    ap.add_argument("--suffix", default="", help="appended to output file names")
    ap.add_argument("--config", default=os.path.join(HERE, "config"),
                    help="istiod --configDir (default: config/ next to this script)")
    ap.add_argument("--mesh", help="mesh config file (default: mesh.yaml, or its Helm-like variant for --profile default)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="extra environment for istiod (repeatable)")
    ap.add_argument("--interception", help="override the sidecar's INTERCEPTION_MODE (e.g. NONE)")
    ap.add_argument("--strict", action="store_true",
                    help="fail on rejections even in the default profile")
    a = ap.parse_args()

    istiod = a.istiod or subprocess.check_output(
        [os.path.join(HERE, "build-istiod.sh")], text=True).strip().splitlines()[-1]
    if not os.access(a.envoy, os.X_OK):
        sys.exit(f"envoy not found at {a.envoy} (set ENVOY_BIN)")
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="legate-istio-")

    mesh = os.path.join(HERE, "mesh.yaml")
    env = dict(os.environ, POD_NAMESPACE="istio-system")
    if a.profile == "upstream":
        env.update(UPSTREAM_ENV)
    else:
        for k in UPSTREAM_ENV:
            env.pop(k, None)
        text = open(mesh).read()
        text = re.sub(r"(?m)^defaultProviders: \{\}$",
                      "defaultProviders:\n  metrics: [prometheus]", text)
        mesh = os.path.join(work, "mesh-default.yaml")
        open(mesh, "w").write(text)

    if a.mesh:
        mesh = a.mesh
    for kv in a.env:
        k, _, v = kv.partition("=")
        env[k] = v

    ports = {k: free_port() for k in ("grpc", "http", "mon", "ctrlz")}
    istiod_cmd = [
        istiod, "discovery", "--registries=",
        f"--configDir={a.config}", f"--meshConfig={mesh}",
        f"--grpcAddr=127.0.0.1:{ports['grpc']}", f"--httpAddr=127.0.0.1:{ports['http']}",
        f"--monitoringAddr=127.0.0.1:{ports['mon']}", "--httpsAddr=", "--secureGRPCAddr=",
        f"--ctrlz_port={ports['ctrlz']}", "--log_output_level=default:info",
    ]
    print(f"profile={a.profile} istiod xds=127.0.0.1:{ports['grpc']} http=127.0.0.1:{ports['http']}")
    ilog = open(os.path.join(a.out, f"istiod-{a.profile}{a.suffix}.log"), "w")
    procs = []
    ist = subprocess.Popen(istiod_cmd, env=env, stdout=ilog, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
    procs.append(ist)

    def cleanup(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))
    bad = 0
    try:
        if not wait_port(ports["grpc"], time.time() + 60, ist):
            sys.exit("istiod did not start; see " + ilog.name)
        for node in a.nodes.split(","):
            for fl in a.flavours.split(","):
                if a.profile == "upstream":
                    name = f"{node}-{fl}"
                else:  # sidecar-default.json (SotW), sidecar-default-delta.json
                    name = f"{node}-{a.profile}" + ("" if fl == "sotw" else f"-{fl}")
                name += a.suffix
                admin = free_port()
                boot = open(os.path.join(HERE, f"envoy-{node}.yaml")).read()
                boot = (boot.replace("{{XDS_PORT}}", str(ports["grpc"]))
                        .replace("{{ADMIN_PORT}}", str(admin))
                        .replace("{{ADS_API_TYPE}}", FLAVOURS[fl]))
                if a.interception:
                    boot = re.sub(r"INTERCEPTION_MODE: \w+", f"INTERCEPTION_MODE: {a.interception}", boot)
                bpath = os.path.join(work, f"{name}.yaml")
                open(bpath, "w").write(boot)
                elog = os.path.join(a.out, f"{name}.envoy.log")
                ep = subprocess.Popen([a.envoy, "-c", bpath, "--use-dynamic-base-id",
                                       "--concurrency", "1", "-l", "info",
                                       "--log-path", elog],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      stdin=subprocess.DEVNULL)
                procs.append(ep)
                deadline = time.time() + a.timeout
                st = {}
                while time.time() < deadline and ep.poll() is None:
                    try:
                        st = parse_stats(http_get(f"http://127.0.0.1:{admin}/stats"))
                    except OSError:
                        time.sleep(0.3)
                        continue
                    if (st.get("server.state") == 0 and st.get("listener_manager.lds.update_success", 0) > 0
                            and st.get("cluster_manager.cds.update_success", 0) > 0):
                        break
                    if st.get("listener_manager.lds.update_rejected", 0) or st.get("cluster_manager.cds.update_rejected", 0):
                        if st.get("server.state") == 0:
                            break
                    time.sleep(0.3)
                time.sleep(a.settle)
                try:
                    stats_txt = http_get(f"http://127.0.0.1:{admin}/stats")
                    st = parse_stats(stats_txt)
                    dump = envoy_config_dump(admin)
                    syncz = http_get(f"http://127.0.0.1:{ports['http']}/debug/syncz")
                    # What istiod generated for this proxy, rendered by istiod
                    # (knows Istio's own extension types, unlike Envoy's dump).
                    pid = NODE_IDS[node]
                    try:
                        istiod_dump = http_get(f"http://127.0.0.1:{ports['http']}/debug/config_dump?proxyID={pid}", timeout=15)
                        open(os.path.join(a.out, f"{name}.istiod.json"), "w").write(istiod_dump)
                    except OSError as e:
                        print(f"{name}: istiod /debug/config_dump failed: {e}")
                except OSError as e:
                    print(f"{name}: FAILED to query admin: {e} (envoy exit={ep.poll()}, log {elog})")
                    bad += 1
                    continue
                open(os.path.join(a.out, f"{name}.json"), "w").write(dump)
                open(os.path.join(a.out, f"{name}.stats.txt"), "w").write("\n".join(
                    l for l in stats_txt.splitlines()
                    if re.search(r"(\.cds\.|\.lds\.|\.rds\.|update_|server\.state|control_plane|warming)", l)) + "\n")
                try:
                    sz = json.loads(syncz)
                except ValueError:
                    sz = syncz
                open(os.path.join(a.out, f"{name}.syncz.json"), "w").write(json.dumps(sz, indent=1))
                agg = xds_summary(st)
                d = json.loads(dump)
                counts = {}
                for c in d.get("configs", []):
                    t = c["@type"].rsplit(".", 1)[-1]
                    if t == "ListenersConfigDump":
                        dl = c.get("dynamic_listeners", [])
                        counts["listeners"] = sum(1 for l in dl if "active_state" in l)
                        if any("warming_state" in l for l in dl):
                            counts["listeners_warming"] = sum(1 for l in dl if "warming_state" in l)
                        if any("error_state" in l for l in dl):
                            counts["listeners_error"] = sum(1 for l in dl if "error_state" in l)
                    elif t == "ClustersConfigDump":
                        counts["clusters"] = len(c.get("dynamic_active_clusters", []))
                        if c.get("dynamic_warming_clusters"):
                            counts["clusters_warming"] = len(c["dynamic_warming_clusters"])
                    elif t == "RoutesConfigDump":
                        counts["routes"] = len(c.get("dynamic_route_configs", []))
                    elif t == "EndpointsConfigDump":
                        counts["eds"] = len(c.get("dynamic_endpoint_configs", []))
                    else:  # per-resource fallback entries
                        key = {"DynamicListener": "listeners", "DynamicCluster": "clusters",
                               "DynamicRouteConfig": "routes", "DynamicEndpointConfig": "eds"}.get(
                                   t.replace("ListenersConfigDump.", "").replace("ClustersConfigDump.", "")
                                   .replace("RoutesConfigDump.", "").replace("EndpointsConfigDump.", ""))
                        if key:
                            counts[key] = counts.get(key, 0) + 1
                if d.get("legate_dump_errors"):
                    counts["dump_errors"] = ",".join(d["legate_dump_errors"])
                rejected = sum(v["rejected"] for v in agg.values())
                ok = (rejected == 0 and st.get("server.state") == 0
                      and not counts.get("listeners_warming") and not counts.get("clusters_warming")
                      and agg["cds"]["success"] > 0 and agg["lds"]["success"] > 0)
                if not ok:
                    bad += 1
                print(f"{name}: {'OK' if ok else 'FAIL'} state={st.get('server.state')} "
                      f"connected={st.get('control_plane.connected_state')} "
                      + " ".join(f"{t}(succ={v['success']},rej={v['rejected']},subs={v['n']})" for t, v in agg.items())
                      + " warming(l=%s,c=%s) " % (st.get("listener_manager.total_listeners_warming"),
                                                 st.get("cluster_manager.warming_clusters"))
                      + " ".join(f"{k}={v}" for k, v in counts.items()))
                # stop Envoy first: it flushes --log-path only every 10s
                ep.send_signal(signal.SIGTERM)
                try:
                    ep.wait(10)
                except subprocess.TimeoutExpired:
                    ep.kill()
                if rejected:
                    # one line per distinct reason, with the resources it hit
                    why = {}
                    for line in open(elog, errors="replace"):
                        m = re.search(r"(cds: cluster|lds: listener) '([^']*)' config rejected: (.*)", line)
                        if m:
                            why.setdefault((m.group(1).split(":")[0], m.group(3).strip()), []).append(m.group(2))
                    for (kind, reason), names in sorted(why.items()):
                        names = sorted(set(names))
                        print(f"    {kind.upper()} x{len(names)}: {reason}  [{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}]")
    finally:
        cleanup()
    if bad and (a.profile == "upstream" or a.strict):
        sys.exit(1)


if __name__ == "__main__":
    main()
