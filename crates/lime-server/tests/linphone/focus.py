"""A conference focus for one-to-one encrypted chat rooms, as Flexisip's
conference server is one for liblinphone (chat room backend FlexisipChat,
encryption LIME). Loaded into the registrar's process:

    python3 registrar.py --realm example.org --module focus

so that it knows every device that registered (its GRUU and its connection).
Just what liblinphone 5.1 needs, from its ClientGroupChatRoom:

1. The creator's INVITE to the factory (`sip:conference-factory@REALM`, a
   resource-lists body naming the other participant, maybe deflated) gets a 200
   whose Contact is the new chat room's address with the `isfocus` parameter: the
   client then takes that address as the room's (ConferenceId peer).
2. The focus INVITEs every registered device of the other participant, From the
   room, To the device's GRUU (the room's local address on that device, and the
   LIME device id), with a Contact `;text;isfocus` and the One-To-One-Chat-Room /
   End-To-End-Encrypted headers: the device's core creates its side of the room
   (coreapi/callbacks.c) and accepts.
3. Each side SUBSCRIBEs to the room (Event: conference) and gets a NOTIFY with
   the full state (conference-info): the participants and their devices (GRUUs).
   LIME encrypts for exactly those devices.
4. A MESSAGE to the room (multipart/encrypted, one key per device) gets a 202 and
   is relayed unchanged to every device of the room but the sender's, From the
   room: a device finds its room by (From, To).

Flexisip answers the creation with a redirect to the room and keeps the
participants' state; none of that matters to two devices talking once.

Reports JSON lines (see sip.report): "room" on creation, "invited" for each
device INVITE and its answer, "notify" for each NOTIFY sent, "relayed" for each
MESSAGE relayed (with its Content-Type and body: the test checks the body is
ciphertext), "delivery" for each device's answer to a relayed MESSAGE.
"""

import secrets
import zlib
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import sip

FACTORY_USER = "conference-factory"
ROOM_PREFIX = "chatroom-"
RESOURCE_LISTS = "urn:ietf:params:xml:ns:resource-lists"


def address_of_record(uri):
    """`sip:user@host` of any SIP URI (parameters, port and `sips` aside), the key
    of the registrar's bindings."""
    uri = sip.uri_of(uri)
    rest = uri.split(":", 1)[1].split(";")[0]
    user, _, host = rest.rpartition("@")
    return f"sip:{user}@{host.split(':')[0]}" if user else f"sip:{host}"


def body_text(request):
    """The body of `request` as text, inflated when liblinphone deflated it
    (Content-Encoding: deflate, zlib format)."""
    body = request.body
    if (request.get("Content-Encoding") or "").strip().lower() == "deflate":
        body = zlib.decompress(body)
    return body.decode("utf-8")


def resource_list_uris(xml):
    """The entry URIs of a resource-lists document."""
    root = ElementTree.fromstring(xml)
    return [entry.get("uri") for entry in root.iter(f"{{{RESOURCE_LISTS}}}entry")]


def resource_list(uris):
    entries = "".join(f"<entry uri={quoteattr(uri)}/>" for uri in uris)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<resource-lists xmlns="{RESOURCE_LISTS}"><list>{entries}</list></resource-lists>'
    ).encode()


def new_branch():
    return "z9hG4bK" + secrets.token_hex(8)


class Room:
    def __init__(self, address, participants, subject):
        self.address = address  # sip:chatroom-...@realm, no parameters
        self.participants = participants  # addresses of record, creator first
        self.subject = subject
        self.version = 0  # of the conference-info documents sent


class Focus:
    def __init__(self, server, registrar):
        self.server = server
        self.registrar = registrar
        self.rooms = {}  # room user part -> Room
        self.pending = {}  # Call-ID of a request we sent -> (method, request)

    # --- helpers ---------------------------------------------------------------

    def own_via(self):
        return f"SIP/2.0/TCP 127.0.0.1:{self.server.port};branch={new_branch()}"

    def record_route(self):
        # In-dialog requests (the ACK of our 200s) come back here rather than to
        # the room's domain, which does not resolve.
        return ("Record-Route", f"<sip:127.0.0.1:{self.server.port};transport=tcp;lr>")

    def room_of(self, request):
        user = sip.user_of(request.uri)
        return self.rooms.get(user) if user.startswith(ROOM_PREFIX) else None

    def devices(self, room):
        """(address of record, Binding) of every registered device of the room."""
        for aor in room.participants:
            for binding in self.registrar.devices(aor).values():
                yield aor, binding

    def send_request(self, connection, method, target, from_tag, to, headers, body=b""):
        """Sends a request from the room down `connection`. `headers` names the
        room ("room", the From address) and, for a request in an existing dialog,
        its "call_id" and "cseq"; its other entries are headers, in order."""
        request = sip.Message(
            f"{method} {target} SIP/2.0",
            [
                ("Via", self.own_via()),
                ("Max-Forwards", "70"),
                ("From", f"<{headers.pop('room')}>;tag={from_tag}"),
                ("To", to),
                ("Call-ID", headers.pop("call_id", secrets.token_hex(12))),
                ("CSeq", f"{headers.pop('cseq', 1)} {method}"),
            ]
            + list(headers.items()),
            body,
        )
        self.pending[request.get("Call-ID")] = (method, request)
        connection.send(request)
        return request

    # --- requests --------------------------------------------------------------

    def on_invite(self, server, connection, request):
        user = sip.user_of(request.uri)
        room = self.room_of(request)
        if user == FACTORY_USER:
            self.create_room(connection, request)
        elif room is not None:
            # A re-INVITE (subject change, rejoin): nothing to change here.
            contact = ("Contact", f"<{room.address}>;isfocus")
            connection.send(sip.response(request, 200, "OK", [contact, self.record_route()]))
        else:
            connection.send(sip.response(request, 404, "Not Found"))

    def create_room(self, connection, request):
        creator = address_of_record(request.get("From"))
        invited = [address_of_record(uri) for uri in resource_list_uris(body_text(request))]
        if request.get("One-To-One-Chat-Room") != "true" or len(invited) != 1:
            connection.send(sip.response(request, 488, "Not Acceptable Here"))
            sip.report("error", message="only one-to-one chat rooms", invited=invited)
            return
        user = ROOM_PREFIX + secrets.token_hex(6)
        room = Room(f"sip:{user}@{self.registrar.realm}", [creator] + invited, request.get("Subject") or "")
        self.rooms[user] = room
        sip.report("room", address=room.address, participants=room.participants)
        contact = ("Contact", f"<{room.address}>;isfocus")
        connection.send(sip.response(request, 200, "OK", [contact, self.record_route()]))
        for aor, binding in self.devices(room):
            if aor != creator:
                self.invite_device(room, aor, binding)

    def invite_device(self, room, aor, binding):
        others = [participant for participant in room.participants if participant != aor]
        headers = {
            "room": room.address,
            "Contact": f"<{room.address}>;text;isfocus",
            "Subject": room.subject,
            "One-To-One-Chat-Room": "true",
            "End-To-End-Encrypted": "true",
            "Content-Type": "application/resource-lists+xml",
            "Content-Disposition": "recipient-list-history; handling=optional",
            "Record-Route": self.record_route()[1],
            "Allow": "INVITE, ACK, BYE, CANCEL, SUBSCRIBE, NOTIFY, MESSAGE",
        }
        self.send_request(
            binding.connection,
            "INVITE",
            sip.uri_of(binding.contact),
            secrets.token_hex(6),
            f"<{binding.gruu}>",
            headers,
            resource_list(others),
        )
        sip.report("invited", room=room.address, device=binding.gruu)

    def on_subscribe(self, server, connection, request):
        room = self.room_of(request)
        if room is None or (request.get("Event") or "").split(";")[0].strip() != "conference":
            connection.send(sip.response(request, 404, "Not Found"))
            return
        expires = request.get("Expires", "600")
        answer = sip.response(
            request,
            200,
            "OK",
            [("Contact", f"<{room.address}>;isfocus"), ("Expires", expires), self.record_route()],
        )
        connection.send(answer)
        # The NOTIFY is a request of the dialog the 200 made: our tag is the one
        # the 200's To got, the subscriber's is its From's.
        our_tag = sip.parameter(answer.get("To"), "tag")
        state = f"active;expires={expires}" if expires != "0" else "terminated;reason=timeout"
        room.version += 1
        body = self.conference_info(room)
        self.send_request(
            connection,
            "NOTIFY",
            sip.uri_of(request.get("Contact") or request.get("From")),
            our_tag,
            request.get("From"),
            {
                "room": room.address,
                "call_id": request.get("Call-ID"),
                "cseq": room.version,
                "Event": "conference",
                "Subscription-State": state,
                "Contact": f"<{room.address}>;isfocus",
                "Content-Type": "application/conference-info+xml",
            },
            body,
        )
        sip.report("notify", room=room.address, to=sip.uri_of(request.get("From")), version=room.version)

    def conference_info(self, room):
        """The full state of `room`: its participants and their devices, in the
        order of RFC 4575's schema (liblinphone parses it with its XSD)."""
        users = []
        for aor in room.participants:
            endpoints = "".join(
                f"<endpoint entity={quoteattr(binding.gruu)} state=\"full\"><status>connected</status></endpoint>"
                for binding in self.registrar.devices(aor).values()
            )
            users.append(
                f"<user entity={quoteattr(aor)} state=\"full\"><roles><entry>participant</entry></roles>"
                f"{endpoints}</user>"
            )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<conference-info xmlns="urn:ietf:params:xml:ns:conference-info" '
            f'entity={quoteattr(room.address)} state="full" version="{room.version}">'
            "<conference-description>"
            f"<subject>{escape(room.subject)}</subject><keywords>one-to-one</keywords>"
            "</conference-description>"
            f"<users>{''.join(users)}</users>"
            "</conference-info>"
        ).encode()

    def on_message(self, server, connection, request):
        room = self.room_of(request)
        if room is None:
            connection.send(sip.response(request, 404, "Not Found"))
            return
        connection.send(sip.response(request, 202, "Accepted"))
        sender = sip.uri_of(request.get("From"))
        content_type = request.get("Content-Type")
        for _, binding in self.devices(room):
            if binding.gruu == sender:
                continue
            headers = {"room": room.address, "Content-Type": content_type}
            # liblinphone deflates some bodies (its delivery notifications).
            if request.get("Content-Encoding"):
                headers["Content-Encoding"] = request.get("Content-Encoding")
            self.send_request(
                binding.connection,
                "MESSAGE",
                sip.uri_of(binding.contact),
                secrets.token_hex(6),
                f"<{binding.gruu}>",
                headers,
                request.body,
            )
            sip.report(
                "relayed",
                room=room.address,
                sender=sender,
                device=binding.gruu,
                content_type=content_type,
                body=body_text(request),
            )

    def on_bye(self, server, connection, request):
        connection.send(sip.response(request, 200, "OK"))

    # --- responses to our requests ---------------------------------------------

    def on_response(self, server, connection, answer):
        method, request = self.pending.get(answer.get("Call-ID"), (None, None))
        if request is None or answer.status < 200:
            return
        if method == "INVITE":
            sip.report("invited", device=sip.uri_of(request.get("To")), status=answer.status)
            if answer.status < 300:
                # ACK the 200: to the device's Contact, with the dialog's tags.
                ack = sip.Message(
                    f"ACK {sip.uri_of(answer.get('Contact') or request.uri)} SIP/2.0",
                    [
                        ("Via", self.own_via()),
                        ("Max-Forwards", "70"),
                        ("From", request.get("From")),
                        ("To", answer.get("To")),
                        ("Call-ID", request.get("Call-ID")),
                        ("CSeq", f"{request.get('CSeq').split()[0]} ACK"),
                    ],
                )
                connection.send(ack)
        elif method == "MESSAGE":
            sip.report("delivery", device=sip.uri_of(request.get("To")), status=answer.status)
        if method != "INVITE" or answer.status >= 200:
            self.pending.pop(answer.get("Call-ID"), None)


def attach(server, registrar):
    """Adds the focus's handlers to the registrar's server."""
    focus = Focus(server, registrar)
    server.handlers["INVITE"] = focus.on_invite
    server.handlers["SUBSCRIBE"] = focus.on_subscribe
    server.handlers["MESSAGE"] = focus.on_message
    server.handlers["BYE"] = focus.on_bye
    server.response_handler = focus.on_response
    return focus
