#!/usr/bin/env python3
"""Readiness probe for Cassandra that speaks the CQL native protocol (v4).

Connects, sends STARTUP {CQL_VERSION: 3.0.0}, expects READY, runs
`SELECT release_version FROM system.local` at consistency ONE and prints the
version. Exit 0 on success, 1 with a one-line reason on stderr otherwise.

Standard library only, so it runs before anything else is installed.

With --peers N, also checks that the node lists exactly N peers in
system.peers (cassandra-cluster.sh: every node sees the other two).

usage: cqlping.py [--host H] [--port P] [--timeout S] [--peers N]
"""

import argparse
import os
import socket
import struct
import sys

PROTOCOL_VERSION = 0x04
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x03, 0x07, 0x08
CONSISTENCY_ONE = 0x0001
RESULT_ROWS = 0x0002
QUERY = "SELECT release_version FROM system.local"

OPCODE_NAMES = {0x00: "ERROR", 0x02: "READY", 0x03: "AUTHENTICATE", 0x06: "SUPPORTED", 0x08: "RESULT", 0x0C: "EVENT"}


class CqlError(Exception):
    pass


# --- encoding -----------------------------------------------------------------

def string(s):
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


def long_string(s):
    b = s.encode("utf-8")
    return struct.pack(">i", len(b)) + b


def string_map(m):
    out = struct.pack(">H", len(m))
    for k, v in m.items():
        out += string(k) + string(v)
    return out


def frame(stream, opcode, body):
    return struct.pack(">BBhBi", PROTOCOL_VERSION, 0, stream, opcode, len(body)) + body


# --- decoding -----------------------------------------------------------------

class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise CqlError("truncated response body")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self):
        return self.take(1)[0]

    def short(self):
        return struct.unpack(">H", self.take(2))[0]

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def string(self):
        return self.take(self.short()).decode("utf-8", "replace")

    def bytes(self):
        n = self.int()
        return None if n < 0 else self.take(n)

    def option(self):
        """Skip a column type [option], recursing into collection/UDT/tuple types."""
        kind = self.short()
        if kind == 0x0000:            # custom: class name
            self.string()
        elif kind in (0x0020, 0x0022):  # list, set
            self.option()
        elif kind == 0x0021:          # map
            self.option()
            self.option()
        elif kind == 0x0030:          # UDT
            self.string()
            self.string()
            for _ in range(self.short()):
                self.string()
                self.option()
        elif kind == 0x0031:          # tuple
            for _ in range(self.short()):
                self.option()
        return kind


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise CqlError("server closed the connection (not a CQL native-protocol port, or shutting down)")
        buf += chunk
    return buf


def recv_frame(sock, stream):
    while True:
        version, _flags, got_stream, opcode, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
        body = recv_exact(sock, length) if length else b""
        if version & 0x7F != PROTOCOL_VERSION:
            raise CqlError("server answered with protocol version %d" % (version & 0x7F))
        if got_stream == stream:
            return opcode, body
        # Anything else (e.g. an EVENT on stream -1) is not ours: skip it.


def error_message(body):
    r = Reader(body)
    code = r.int()
    return "server error 0x%04X: %s" % (code, r.string())


def expect(opcode, body, wanted):
    if opcode == OP_ERROR:
        raise CqlError(error_message(body))
    if opcode == OP_AUTHENTICATE:
        raise CqlError("server requires authentication (expected AllowAllAuthenticator)")
    if opcode != wanted:
        raise CqlError("expected %s, got opcode %s" % (OPCODE_NAMES.get(wanted, wanted),
                                                      OPCODE_NAMES.get(opcode, hex(opcode))))


def rows(body):
    """A reader positioned at the first row of a RESULT Rows body, the row count and the column count."""
    r = Reader(body)
    kind = r.int()
    if kind != RESULT_ROWS:
        raise CqlError("expected a Rows result, got result kind %d" % kind)
    flags = r.int()
    columns = r.int()
    if flags & 0x0002:  # has_more_pages: paging state
        r.bytes()
    if not flags & 0x0004:  # metadata present
        global_spec = flags & 0x0001
        if global_spec:
            r.string()
            r.string()
        for _ in range(columns):
            if not global_spec:
                r.string()
                r.string()
            r.string()
            r.option()
    return r, r.int(), columns


def first_cell(body):
    """First column of the first row of a RESULT Rows body, as text."""
    r, count, columns = rows(body)
    if count < 1 or columns < 1:
        raise CqlError("query returned no rows")
    value = r.bytes()
    if value is None:
        raise CqlError("release_version is null")
    return value.decode("utf-8", "replace")


def query(sock, stream, text):
    sock.sendall(frame(stream, OP_QUERY, long_string(text) + struct.pack(">HB", CONSISTENCY_ONE, 0)))
    opcode, body = recv_frame(sock, stream)
    expect(opcode, body, OP_RESULT)
    return body


def ping(host, port, timeout, peers=None):
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise CqlError("cannot connect to %s:%d: %s" % (host, port, e.strerror or e))
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(frame(1, OP_STARTUP, string_map({"CQL_VERSION": "3.0.0"})))
            expect(*recv_frame(sock, 1), OP_READY)
            version = first_cell(query(sock, 2, QUERY))
            if peers is not None:
                _, seen, _ = rows(query(sock, 3, "SELECT peer FROM system.peers"))
                if seen != peers:
                    raise CqlError("%s:%d lists %d peers, not %d" % (host, port, seen, peers))
            return version
        except socket.timeout:
            raise CqlError("no answer from %s:%d within %gs" % (host, port, timeout))
        except OSError as e:
            raise CqlError("connection to %s:%d failed: %s" % (host, port, e.strerror or e))


def main():
    p = argparse.ArgumentParser(description="Check that Cassandra answers a CQL query.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("CQL_PORT", "19042")))
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per network operation")
    p.add_argument("--peers", type=int, help="also require exactly this many peers in system.peers")
    a = p.parse_args()
    try:
        print(ping(a.host, a.port, a.timeout, a.peers))
    except CqlError as e:
        print("cqlping: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
