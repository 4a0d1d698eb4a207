"""CurveZMQ keys and the ZAP handler that ties every scheduler connection to its CURVE key.

Every link to the scheduler is CURVE-encrypted and authenticated unless a user
explicitly asks for ``insecure=True`` (round traffic between peers is sealed
message by message instead, see :mod:`lightning_secagg.sealing`). The
scheduler is a CURVE *server*; its ZAP handler (a REP socket on
``inproc://zeromq.zap.01`` in its own ZeroMQ context, polled by the thread
that owns the other sockets) accepts any well-formed CURVE client and stamps
its public key as the connection's ``User-Id``. Authorization happens per
message: the scheduler accepts a sign-up only with the key it arrived on, and
a ``done``, ``abort`` or ``leave`` only from the key holding the peer id.
Nothing is trusted because a header says so.

Key files use pyzmq's certificate format (``zmq.auth``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both keys and should stay private.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from lightning_secagg import messages
from lightning_secagg.errors import ConfigurationError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def key_fingerprint(public_key: str) -> str:
    """A short, non-secret name for a public key, for logs (never log a secret key)."""
    return hashlib.sha256(public_key.encode()).hexdigest()[:12]


def is_z85_key(value: str) -> bool:
    """True for a 40-character Z85 CurveZMQ key (:func:`lightning_secagg.messages.is_z85_key`)."""
    return messages.is_z85_key(value)


@dataclass(frozen=True, repr=False)
class KeyPair:
    """A CurveZMQ key pair in Z85 text. ``repr`` shows only the fingerprint."""

    public: str
    secret: str

    def __repr__(self) -> str:
        return f"KeyPair(fingerprint={key_fingerprint(self.public)})"

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from libzmq's CSPRNG."""
        public, secret = zmq.curve_keypair()
        return cls(public.decode(), secret.decode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read a ``.key_secret`` file written by :func:`write_key_files` (or pyzmq).

        Raises:
            ConfigurationError: missing file, or a file without a secret key.
        """
        try:
            public, secret = zmq.auth.load_certificate(os.fspath(path))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read key file {os.fspath(path)!r}: {exc}") from None
        if secret is None:
            raise ConfigurationError(
                f"{os.fspath(path)!r} holds only a public key; pass the .key_secret file"
            )
        return cls(public.decode(), secret.decode())


def write_key_files(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (private, mode 0600).

    Returns:
        The public and the secret file's paths.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(d, name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def read_public_key(value: str | os.PathLike[str]) -> str:
    """A public key given as Z85 text or as a key file's path.

    Raises:
        ConfigurationError: neither a valid key nor a readable key file.
    """
    if isinstance(value, str) and is_z85_key(value):
        return value
    path = os.fspath(value)
    if not os.path.exists(path):
        raise ConfigurationError(
            f"scheduler_key must be a 40-character Z85 public key or a key file, got {value!r:.60}"
        )
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read key file {path!r}: {exc}") from None
    return public.decode()


def make_curve_server(sock: zmq.Socket, keys: KeyPair) -> None:
    """Make ``sock`` a CURVE server with ``keys`` (before bind)."""
    sock.curve_secretkey = keys.secret.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_server = True
    sock.zap_domain = b"lightning-secagg"


def make_curve_client(sock: zmq.Socket, keys: KeyPair, server_public: str) -> None:
    """Make ``sock`` a CURVE client of the server with ``server_public`` (before connect)."""
    sock.curve_secretkey = keys.secret.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_serverkey = server_public.encode()


def sender_key(frame: zmq.Frame) -> str | None:
    """The CURVE public key the ZAP handler stamped on ``frame``'s connection (None if plain)."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user or None


class ZapHandler:
    """Answers libzmq's authentication requests for one context.

    Poll :attr:`socket` with the others and call :meth:`handle` when it is readable.
    """

    def __init__(self, ctx: zmq.Context) -> None:
        self.socket = ctx.socket(zmq.REP)
        self.socket.linger = 0
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self.socket.close(linger=0)
            raise ConfigurationError(f"cannot start the ZAP handler: {exc.strerror}") from exc

    def handle(self) -> None:
        """Answer one request: CURVE clients pass with their key as User-Id, the rest fail."""
        frames = self.socket.recv_multipart()
        if len(frames) < 6:  # a ZAP request always has at least 6 frames
            self.socket.send_multipart([b"1.0", b"", b"400", b"malformed", b"", b""])
            return
        request_id, address, mechanism, credentials = frames[1], frames[3], frames[5], frames[6:]
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            user = zmq.utils.z85.encode(credentials[0])
            self.socket.send_multipart([b"1.0", request_id, b"200", b"OK", user, b""])
            return
        log.warning(
            "refused a %s connection from %s: only CURVE is accepted",
            mechanism.decode(errors="replace")[:16],
            address.decode(errors="replace")[:64],
        )
        self.socket.send_multipart([b"1.0", request_id, b"400", b"CURVE required", b"", b""])

    def close(self) -> None:
        """Close the handler's socket."""
        self.socket.close(linger=0)
