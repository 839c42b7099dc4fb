"""A SIP registrar for the Linphone tests, on loopback TCP.

    python3 registrar.py --realm example.org [--challenge MD5|SHA-256]
                         [--account USER:PASSWORD ...] [--module NAME ...]

Answers REGISTER with 200 and the device's Contact carrying a `pub-gruu`
(`sip:user@realm;gr=urn:uuid:...` from the +sip.instance the device sent): that
GRUU is the device id liblinphone gives its LIME user. With --challenge, a
REGISTER without valid credentials first gets a 401 challenge with that
algorithm, as Flexisip sends it, and the answer is checked against the
--account passwords: so liblinphone stores the HA1 of that algorithm. Each
--module is imported from this directory and its `attach(server, registrar)`
called (a conference focus adds its handlers that way).

Reports JSON lines on stdout: {"event":"listening","port":N} first, then one
"register" line for each REGISTER answered.
"""

import argparse
import asyncio
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sip  # noqa: E402


class Binding:
    """Where a registered device is: its GRUU, its Contact, its connection."""

    def __init__(self, gruu, contact, connection):
        self.gruu = gruu
        self.contact = contact
        self.connection = connection


class Registrar:
    def __init__(self, realm, challenge=None, accounts=None):
        self.realm = realm
        self.challenge = challenge  # None, "MD5" or "SHA-256"
        self.accounts = accounts or {}  # user -> password
        # address of record (sip:user@realm) -> {gruu: Binding}
        self.bindings = {}

    def attach(self, server):
        server.handlers["REGISTER"] = self.on_register

    def devices(self, aor):
        """The bindings of an address of record, by GRUU."""
        return self.bindings.get(aor, {})

    def on_register(self, server, connection, request):
        aor = sip.uri_of(request.get("To"))
        user = sip.user_of(aor)
        algorithm = None
        if self.challenge:
            authorization = request.get("Authorization")
            fields = sip.digest_fields(authorization) if authorization else {}
            password = self.accounts.get(user)
            if not authorization or password is None or fields.get("username") != user:
                # Unknown user or no credentials: a fresh challenge.
                header = sip.challenge_header(self.realm, self.challenge)
                connection.send(sip.response(request, 401, "Unauthorized", [("WWW-Authenticate", header)]))
                sip.report("register", aor=aor, status=401, algorithm=self.challenge)
                return
            if not sip.digest_valid(fields, "REGISTER", password, self.realm):
                connection.send(sip.response(request, 403, "Forbidden"))
                sip.report("register", aor=aor, status=403)
                return
            algorithm = fields.get("algorithm", "MD5").strip('"')
        contact = request.get("Contact")
        expires = request.get("Expires", "3600")
        if contact and sip.parameter(contact, "expires") is not None:
            expires = sip.parameter(contact, "expires")
        instance = sip.parameter(contact, "+sip.instance") if contact else None
        gruu = None
        headers = []
        if contact and instance:
            uuid = instance.strip("<>")
            gruu = f"{aor};gr={uuid}"
            if expires == "0":
                self.bindings.get(aor, {}).pop(gruu, None)
            else:
                self.bindings.setdefault(aor, {})[gruu] = Binding(gruu, contact, connection)
            headers.append(("Contact", f'{contact.split(";expires=")[0]};expires={expires};pub-gruu="{gruu}"'))
        elif contact and contact != "*":
            headers.append(("Contact", f"{contact};expires={expires}"))
        headers.append(("Expires", expires))
        connection.send(sip.response(request, 200, "OK", headers))
        sip.report("register", aor=aor, status=200, gruu=gruu, expires=expires, algorithm=algorithm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realm", required=True)
    parser.add_argument("--challenge", choices=["MD5", "SHA-256"])
    parser.add_argument("--account", action="append", default=[], help="USER:PASSWORD")
    parser.add_argument("--module", action="append", default=[], help="a module with attach(server, registrar)")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    accounts = dict(account.split(":", 1) for account in arguments.account)
    server = sip.SipServer()
    registrar = Registrar(arguments.realm, arguments.challenge, accounts)
    registrar.attach(server)
    for name in arguments.module:
        importlib.import_module(name).attach(server, registrar)
    try:
        asyncio.run(server.serve(arguments.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
