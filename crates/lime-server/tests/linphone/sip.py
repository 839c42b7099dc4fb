"""SIP for the Linphone tests: messages parsed and written, digest challenges
made and checked, and a small server over TCP on loopback that other scripts
(the registrar, a conference focus) build on.

Just enough of RFC 3261 for liblinphone talking to one server over TCP: no UDP, no
retransmissions, no routing beyond "the device that registered this AOR". Every
connection a device opens stays open, and requests to it go down the same one
(as Flexisip does for devices behind NAT).
"""

import asyncio
import hashlib
import json
import secrets
import sys

# --- messages -----------------------------------------------------------------


class Message:
    """A SIP request or response: its first line, its headers in order, its body."""

    def __init__(self, first_line, headers=None, body=b""):
        self.first_line = first_line
        self.headers = list(headers or [])  # [(name, value)], names as sent
        self.body = body

    # "INVITE sip:x SIP/2.0" or "SIP/2.0 200 OK"
    @property
    def is_request(self):
        return not self.first_line.startswith("SIP/2.0 ")

    @property
    def method(self):
        return self.first_line.split(" ", 1)[0] if self.is_request else None

    @property
    def uri(self):
        return self.first_line.split(" ")[1] if self.is_request else None

    @property
    def status(self):
        return None if self.is_request else int(self.first_line.split(" ")[1])

    def get(self, name, default=None):
        """The first value of header `name` (case-insensitive, compact forms too)."""
        values = self.get_all(name)
        return values[0] if values else default

    def get_all(self, name):
        wanted = {name.lower(), COMPACT.get(name.lower(), name.lower())}
        return [value for key, value in self.headers if key.lower() in wanted]

    def set(self, name, value):
        """Replaces every header `name` by one with `value`."""
        wanted = {name.lower(), COMPACT.get(name.lower(), name.lower())}
        self.headers = [(k, v) for k, v in self.headers if k.lower() not in wanted]
        self.headers.append((name, value))

    def to_bytes(self):
        lines = [self.first_line]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in ("content-length", "l")]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


# Long names of the compact header forms liblinphone may send.
COMPACT = {
    "via": "v",
    "from": "f",
    "to": "t",
    "call-id": "i",
    "contact": "m",
    "content-type": "c",
    "content-length": "l",
    "supported": "k",
    "event": "o",
}


def parse(buffer):
    """The first complete message of `buffer` (bytes) and the bytes after it, or
    (None, buffer) when it is not all there yet."""
    while buffer.startswith(b"\r\n"):  # keep-alives between messages
        buffer = buffer[2:]
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None, buffer
    head = buffer[:end].decode("utf-8", "replace").split("\r\n")
    headers = []
    for line in head[1:]:
        if line[:1] in (" ", "\t") and headers:  # folded continuation
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, value = line.split(":", 1)
            headers.append((name.strip(), value.strip()))
    message = Message(head[0], headers)
    length = int(message.get("Content-Length", "0"))
    start = end + 4
    if len(buffer) < start + length:
        return None, buffer
    message.body = buffer[start : start + length]
    return message, buffer[start + length :]


def response(request, status, reason, headers=(), body=b""):
    """A response to `request`: its Via, From, To (with a tag added), Call-ID and
    CSeq, then `headers`."""
    copied = [(k, v) for k, v in request.headers if k.lower() in ("via", "v", "from", "f", "call-id", "i", "cseq")]
    to = request.get("To")
    if to is not None and ";tag=" not in to and status > 100:
        to += ";tag=" + secrets.token_hex(6)
    copied.append(("To", to))
    return Message(f"SIP/2.0 {status} {reason}", copied + list(headers), body)


def parameter(value, name):
    """The value of parameter `name` in a header value (`;name=value` or
    `name="value"`), unquoted, or None."""
    for part in value.replace(",", ";").split(";"):
        key, _, found = part.strip().partition("=")
        if key.strip().lower() == name.lower():
            return found.strip().strip('"')
    return None


def uri_of(value):
    """The URI of a name-addr (`"A" <sip:a@b>;tag=x`) or addr-spec."""
    if "<" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";")[0].strip()


def user_of(uri):
    """`alice` of `sip:alice@example.org;...`."""
    return uri.split(":", 1)[1].split("@")[0]


# --- digest (RFC 8760: MD5 and SHA-256) ------------------------------------------

HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def digest_hash(algorithm, text):
    return HASHES[algorithm](text.encode()).hexdigest()


def challenge_header(realm, algorithm):
    """A WWW-Authenticate value as Flexisip sends it, with a fresh nonce."""
    return f'Digest realm="{realm}", nonce="{secrets.token_hex(16)}", ' f'algorithm={algorithm}, qop="auth"'


def digest_fields(header):
    """The fields of an Authorization: Digest header, as a dict."""
    fields = {}
    rest = header.split(" ", 1)[1] if " " in header else ""
    while rest:
        key, _, rest = rest.partition("=")
        rest = rest.lstrip()
        if rest.startswith('"'):
            value, _, rest = rest[1:].partition('"')
        else:
            value, _, rest = rest.partition(",")
            value = value.strip()
        fields[key.strip().lower()] = value
        rest = rest.lstrip(", ")
    return fields


def digest_valid(fields, method, password, realm):
    """Whether Authorization `fields` answer a challenge for `method` with
    `password` (RFC 2617/8760, qop=auth or none)."""
    algorithm = fields.get("algorithm", "MD5").strip('"')
    if algorithm not in HASHES:
        return False
    ha1 = digest_hash(algorithm, f"{fields.get('username')}:{realm}:{password}")
    ha2 = digest_hash(algorithm, f"{method}:{fields.get('uri')}")
    if fields.get("qop"):
        material = f"{ha1}:{fields.get('nonce')}:{fields.get('nc')}:{fields.get('cnonce')}:{fields.get('qop')}:{ha2}"
    else:
        material = f"{ha1}:{fields.get('nonce')}:{ha2}"
    return digest_hash(algorithm, material) == fields.get("response")


# --- the server ----------------------------------------------------------------


def report(event, **fields):
    """One JSON line on stdout, for the test harness."""
    print(json.dumps({"event": event, **fields}), flush=True)


class Connection:
    """One TCP connection from a device."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.peer = writer.get_extra_info("peername")

    def send(self, message):
        self.writer.write(message.to_bytes())


class SipServer:
    """A SIP server on loopback TCP. Requests go to `handlers[METHOD](server,
    connection, request)`, responses to requests it sent to
    `response_handler(server, connection, response)`. Unknown methods get 501;
    ACK never gets an answer."""

    def __init__(self):
        self.handlers = {}
        self.response_handler = None
        self.port = None

    async def serve(self, port=0):
        server = await asyncio.start_server(self._connection, "127.0.0.1", port)
        self.port = server.sockets[0].getsockname()[1]
        report("listening", port=self.port)
        async with server:
            await server.serve_forever()

    async def _connection(self, reader, writer):
        connection = Connection(reader, writer)
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
                while True:
                    message, buffer = parse(buffer)
                    if message is None:
                        break
                    self._dispatch(connection, message)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _dispatch(self, connection, message):
        try:
            if not message.is_request:
                if self.response_handler:
                    self.response_handler(self, connection, message)
                return
            handler = self.handlers.get(message.method)
            if handler:
                handler(self, connection, message)
            elif message.method != "ACK":
                connection.send(response(message, 501, "Not Implemented"))
        except Exception as error:  # a test tool: say what broke, keep serving
            report("error", message=f"{type(error).__name__}: {error}", first_line=message.first_line)
            print(f"sip.py: {message.first_line}: {error!r}", file=sys.stderr, flush=True)
