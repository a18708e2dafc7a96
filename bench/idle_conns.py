#!/usr/bin/env python3
"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one small request
on each and reads its response, then holds them all open until stdin closes.
Prints "ready <opened>" once every connection has had its response."""
import socket, sys, selectors

port, n = int(sys.argv[1]), int(sys.argv[2])
req = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    socks.append(s)
sel = selectors.DefaultSelector()
pending = {}
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    pending[s] = b""
while pending:
    for key, _ in sel.select(timeout=30):
        s = key.fileobj
        data = s.recv(65536)
        pending[s] += data
        if b"\r\n\r\n" in pending[s] or not data:
            sel.unregister(s)
            del pending[s]
print(f"ready {len(socks)}", flush=True)
sys.stdin.read()
