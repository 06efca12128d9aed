#!/usr/bin/env python3
"""cgload.py — a fixed amount of load for profile.sh (instruction counts need a fixed amount of
work, not a duration):

  cgload.py http PROXY URL TOKEN CONNS REQUESTS   keep-alive GETs in absolute form through the HTTP
                                                  proxy, spread over CONNS connections
  cgload.py bulk SOCKS TARGET MIB                 MIB mebibytes through a no-auth SOCKS5 connect
  cgload.py hold SOCKS TARGET N                   N idle SOCKS5 connections; prints READY, holds
                                                  until stdin closes
  cgload.py sink LISTEN                           reads and discards (prints the port it bound)
"""
import socket
import sys
import threading


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def http_conn(proxy, url, token, n, errors):
    s = socket.create_connection(proxy)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host = url.split("/")[2]
    req = (f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Bearer {token}\r\n"
           "User-Agent: cgload\r\nAccept: */*\r\n\r\n").encode()
    buf = b""
    for _ in range(n):
        s.sendall(req)
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                errors.append("closed")
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            errors.append(head.decode(errors="replace"))
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(buf) < length:
            chunk = s.recv(65536)
            if not chunk:
                errors.append("closed in body")
                return
            buf += chunk
        buf = buf[length:]
    s.close()


def socks(proxy, target):
    s = socket.create_connection(proxy)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    host, port = addr(target)
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        reply += s.recv(10 - len(reply))
    assert reply[1] == 0, reply
    return s


def main():
    mode = sys.argv[1]
    if mode == "http":
        proxy, url, token = addr(sys.argv[2]), sys.argv[3], sys.argv[4]
        conns, total = int(sys.argv[5]), int(sys.argv[6])
        errors = []
        ts = [threading.Thread(target=http_conn, args=(proxy, url, token, total // conns, errors)) for _ in range(conns)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            sys.exit(f"{len(errors)} failed requests, first: {errors[0]}")
    elif mode == "bulk":
        s = socks(addr(sys.argv[2]), sys.argv[3])
        block = b"\x5a" * (1 << 20)
        for _ in range(int(sys.argv[4])):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes after EOF: every byte went through
    elif mode == "hold":
        held = [socks(addr(sys.argv[2]), sys.argv[3]) for _ in range(int(sys.argv[4]))]
        held[-1].sendall(b"x")
        print("READY", len(held), flush=True)
        sys.stdin.read()
    elif mode == "sink":
        ls = socket.socket()
        ls.bind(addr(sys.argv[2]))
        ls.listen(4096)
        print(ls.getsockname()[1], flush=True)

        def drain(c):
            while c.recv(1 << 18):
                pass
            c.close()

        while True:
            c, _ = ls.accept()
            threading.Thread(target=drain, args=(c,), daemon=True).start()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
