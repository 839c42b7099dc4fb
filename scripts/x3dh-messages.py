#!/usr/bin/env python3
"""Hand-built X3DH messages (docs/protocol.md) for the package test, on curve
c25519, with fixed, recognisable key bytes: the server never checks signatures,
so any bytes of the right length will do.

  x3dh-messages.py register DEVICE_ID SEED FILE   registerUser with one OPk
  x3dh-messages.py get-bundle DEVICE_ID FILE      getPeerBundle for one device
  x3dh-messages.py expect-registered FILE         the success answer to registerUser
  x3dh-messages.py expect-bundle DEVICE_ID SEED FLAG FILE
      a peerBundle for DEVICE_ID registered with SEED, with its OPk (FLAG 1) or
      without one (FLAG 0)
Exit status 1, with both byte strings printed, when an answer is not as expected.
"""
import struct
import sys

VERSION, C25519 = 1, 1
REGISTER_USER, GET_PEER_BUNDLE, PEER_BUNDLE = 0x09, 0x05, 0x06
SPK_ID, OPK_ID = 0x01020304, 0x0A0B0C0D


def keys(seed):
    """Ik (32), SPk (32), SPk signature (64) and OPk (32) of a test device."""
    seed = int(seed)
    return (bytes([seed]) * 32, bytes([seed + 1]) * 32, bytes([seed + 2]) * 64,
            bytes([seed + 3]) * 32)


def header(message_type):
    return bytes([VERSION, message_type, C25519])


def register(seed):
    ik, spk, spk_sig, opk = keys(seed)
    return (header(REGISTER_USER) + ik + spk + spk_sig + struct.pack(">I", SPK_ID)
            + struct.pack(">H", 1) + opk + struct.pack(">I", OPK_ID))


def get_bundle(device_id):
    device = device_id.encode()
    return header(GET_PEER_BUNDLE) + struct.pack(">HH", 1, len(device)) + device


def bundle(device_id, seed, flag):
    ik, spk, spk_sig, opk = keys(seed)
    device = device_id.encode()
    body = struct.pack(">HH", 1, len(device)) + device + bytes([int(flag)])
    body += ik + spk + struct.pack(">I", SPK_ID) + spk_sig
    if int(flag) == 1:
        body += opk + struct.pack(">I", OPK_ID)
    return header(PEER_BUNDLE) + body


def expect(wanted, path):
    with open(path, "rb") as answer:
        got = answer.read()
    if got != wanted:
        print(f"x3dh-messages.py: unexpected answer in {path}\n"
              f"  wanted {wanted.hex()}\n  got    {got.hex()}", file=sys.stderr)
        sys.exit(1)


def write(message, path):
    with open(path, "wb") as out:
        out.write(message)


def main(command, *args):
    if command == "register":
        write(register(args[1]), args[2])
    elif command == "get-bundle":
        write(get_bundle(args[0]), args[1])
    elif command == "expect-registered":
        expect(header(REGISTER_USER), args[0])
    elif command == "expect-bundle":
        expect(bundle(args[0], args[1], args[2]), args[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(*sys.argv[1:])
