"""Where a caller's identity comes from, never from a header the caller sets: the kernel's
peer credentials on the head node's Unix socket (exchanged for a short session token, as munge
vouches for a uid), API and node tokens the daemon issued (kept as hashes), or an identity
provider's signed JWT. Role and permission decisions are `core.trust`'s.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import json
import os
import pwd
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.core.errors import NotFound
from gpuctl.core.trust import ApiToken, Principal, Role, RolePolicy, TokenKind, Unauthenticated

if TYPE_CHECKING:
    import grpc

    from gpuctl.store.base import Store

TOKEN_PREFIX = "gpuctl"
SESSION_PREFIX = "gpuctl-session"
AUTH_METADATA = "authorization"
DEFAULT_SESSION_TTL_S = 3600.0
# A local user can open the socket in a loop: each uid keeps only its newest sessions.
MAX_SESSIONS_PER_UID = 64
# How long another gpuctld's revocation of a token may take to reach this one (its own take
# effect at once); Kubernetes' webhook token cache keeps answers for 2 minutes.
TOKEN_CACHE_TTL = timedelta(seconds=1)
MAX_CACHED_TOKENS = 10_000
# Group changes reach gpuctld within a minute (Slurm's group cache: GroupUpdateTime, 10 min).
ACCOUNT_TTL_S = 60.0
MAX_CACHED_ACCOUNTS = 10_000
NO_CREDENTIALS = (
    "no credentials: on the head node use gpuctld's Unix socket; elsewhere a token "
    "(`gpuctl token create`, then GPUCTL_TOKEN) over TLS"
)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token`."""
    return ((AUTH_METADATA, f"Bearer {token}"),)


def _hash(secret: str) -> str:
    # The secrets are 256 random bits: a fast hash cannot be brute-forced, and a slow
    # password hash would cost every call its time (GitHub's and Kubernetes' tokens alike).
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_token(
    kind: TokenKind,
    principal: str,
    *,
    now: datetime,
    created_by: str,
    description: str = "",
    ttl: timedelta | None = None,
) -> tuple[str, ApiToken]:
    """A new token: the bearer text (shown once) and the record to store (its hash only)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = ApiToken(
        id=token_id,
        kind=kind,
        principal=principal,
        secret_hash=_hash(secret),
        description=description,
        created_by=created_by,
        created_at=now,
        expires_at=now + ttl if ttl is not None else None,
    )
    return f"{TOKEN_PREFIX}.{token_id}.{secret}", record


def _split_token(text: str) -> tuple[str, str] | None:
    parts = text.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class Account:
    uid: int | None  # None: no account of that name on the head node
    groups: frozenset[str]


_accounts: dict[str, tuple[Account, float]] = {}
_accounts_lock = threading.Lock()


def account(name: str) -> Account:
    """A local account's uid and groups, as the name service gave them at most ACCOUNT_TTL_S
    ago: every call asks, and a directory behind NSS (LDAP) may take milliseconds to answer."""
    now = time.monotonic()
    with _accounts_lock:
        hit = _accounts.get(name)
    if hit is not None and now < hit[1]:
        return hit[0]
    found = _lookup_account(name)
    with _accounts_lock:
        if len(_accounts) >= MAX_CACHED_ACCOUNTS:
            _accounts.clear()
        _accounts[name] = (found, now + ACCOUNT_TTL_S)
    return found


def _lookup_account(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
        gids = os.getgrouplist(name, entry.pw_gid)
    except (KeyError, OSError):
        return Account(uid=None, groups=frozenset())
    names = set()
    for gid in gids:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return Account(uid=entry.pw_uid, groups=frozenset(names))


def account_groups(name: str) -> frozenset[str]:
    """The groups of a local account (none where it has no account on the head node)."""
    return account(name).groups


@dataclass(frozen=True, slots=True)
class _Session:
    principal: Principal
    expires: float  # monotonic


class SessionBook:
    """Short-lived tokens handed out over the Unix socket; in memory, gone on restart (a
    client then asks the socket again)."""

    def __init__(self, ttl_s: float = DEFAULT_SESSION_TTL_S, clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_hash: dict[str, _Session] = {}
        self._by_uid: dict[int, list[str]] = {}

    def issue(self, principal: Principal) -> str:
        secret = secrets.token_urlsafe(32)
        key = _hash(secret)
        uid = principal.uid if principal.uid is not None else -1
        with self._lock:
            self._by_hash[key] = _Session(principal, self._clock() + self.ttl_s)
            keys = self._by_uid.setdefault(uid, [])
            keys.append(key)
            while len(keys) > MAX_SESSIONS_PER_UID:
                self._by_hash.pop(keys.pop(0), None)
        return f"{SESSION_PREFIX}.{secret}"

    def lookup(self, text: str) -> Principal | None:
        prefix, _, secret = text.partition(".")
        if prefix != SESSION_PREFIX or not secret:
            return None
        key = _hash(secret)
        with self._lock:
            session = self._by_hash.get(key)
            if session is None:
                return None
            if session.expires <= self._clock():
                del self._by_hash[key]
                return None
            return session.principal


class Authenticator:
    """Turns a call's credentials into a `Principal`, or raises `Unauthenticated`."""

    def __init__(
        self,
        store: Store,
        *,
        roles: RolePolicy,
        sessions: SessionBook,
        now: Callable[[], datetime],
        jwt: JwtVerifier | None = None,
    ) -> None:
        self.store = store
        self.roles = roles
        self.sessions = sessions
        self.now = now
        self.jwt = jwt
        # Token records as read, for TOKEN_CACHE_TTL: one read of the store per token and
        # second rather than one per call. Any token written through this store (a revocation)
        # empties it at once; another gpuctld's writes are seen within the ttl.
        self._cache: dict[str, tuple[ApiToken, datetime]] = {}
        self._cache_generation = -1
        self._cache_lock = threading.Lock()

    def authenticate(self, context: grpc.ServicerContext) -> Principal:
        metadata = context.invocation_metadata()
        if not any(k == AUTH_METADATA for k, _ in metadata or ()):
            pem = (context.auth_context() or {}).get("x509_pem_cert")
            if pem:  # the agents' listener verified it against gpuctld's CA
                return self.from_certificate(pem[0])
        return self.from_metadata(metadata)

    def from_certificate(self, pem: bytes) -> Principal:
        """An agent's certificate: valid only while gpuctld's record of it is."""
        from gpuctl.api.pki import node_of_certificate

        found = node_of_certificate(pem)
        if found is None:
            raise Unauthenticated("the client certificate names no node")
        node, serial = found
        try:
            record = self._record(serial)
        except NotFound:
            raise Unauthenticated(f"certificate {serial} is not one gpuctld issued") from None
        if record.kind is not TokenKind.CERT or record.principal != node:
            raise Unauthenticated(f"certificate {serial} is not one gpuctld issued")
        if not record.usable(self.now()):
            raise Unauthenticated(f"certificate {serial} of node {node} is revoked or expired")
        return Principal(name=node, role=Role.NODE, via="cert", credential=serial)

    def from_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        bearer = None
        for key, value in metadata or ():
            if key == AUTH_METADATA:
                if bearer is not None:
                    raise Unauthenticated("more than one authorization header")
                bearer = value
        if bearer is None:
            raise Unauthenticated(NO_CREDENTIALS)
        if not isinstance(bearer, str):
            raise Unauthenticated("authorization: not text")
        scheme, _, credential = bearer.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated("authorization: want 'Bearer <token>'")
        return self.principal_of(credential.strip())

    def principal_of(self, credential: str) -> Principal:
        if len(credential) > 8192:
            raise Unauthenticated("token too long")
        who = self.sessions.lookup(credential)
        if who is not None:
            return who
        parts = _split_token(credential)
        if parts is not None:
            return self._stored(*parts)
        if self.jwt is not None and credential.count(".") == 2:
            name, groups = self.jwt.verify(credential)
            return Principal(name=name, role=self.roles.role_of(name, groups), via="oidc")
        raise Unauthenticated("token not valid: unknown, expired or revoked")

    def _record(self, token_id: str) -> ApiToken:
        now = self.now()
        generation = self.store.token_generation
        with self._cache_lock:
            if generation != self._cache_generation or len(self._cache) >= MAX_CACHED_TOKENS:
                self._cache.clear()
                self._cache_generation = generation
            hit = self._cache.get(token_id)
            if hit is not None and now < hit[1]:
                return hit[0]
        token = self.store.get_token(token_id)  # raises NotFound: unknown ids are not kept
        with self._cache_lock:
            if self._cache_generation == generation:
                self._cache[token_id] = (token, now + TOKEN_CACHE_TTL)
        return token

    def _stored(self, token_id: str, secret: str) -> Principal:
        try:
            token = self._record(token_id)
        except NotFound:
            raise Unauthenticated("token not valid: unknown, expired or revoked") from None
        if not hmac.compare_digest(token.secret_hash, _hash(secret)) or not token.usable(
            self.now()
        ):
            raise Unauthenticated("token not valid: unknown, expired or revoked")
        if token.kind is TokenKind.NODE:
            return Principal(
                name=token.principal, role=Role.NODE, via="node-token", credential=token.id
            )
        if token.kind is TokenKind.JOIN:
            return Principal(
                name=token.principal, role=Role.JOINING, via="join-token", credential=token.id
            )
        if token.kind is not TokenKind.USER:
            raise Unauthenticated("token not valid: unknown, expired or revoked")
        name = token.principal
        return Principal(
            name=name,
            role=self.roles.role_of(name, account_groups(name)),
            via="token",
            credential=token.id,
        )


class JwtVerifier:
    """OIDC access/ID tokens: signature against the provider's published keys (JWKS), issuer,
    audience and expiry, through PyJWT."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str,
        username_claim: str = "preferred_username",
        groups_claim: str = "groups",
        algorithms: tuple[str, ...] = ("RS256", "ES256"),
    ) -> None:
        import jwt  # only sites with an identity provider pay for the import

        self._jwt = jwt
        self._keys = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5)
        self.issuer, self.audience = issuer, audience
        self.username_claim, self.groups_claim = username_claim, groups_claim
        self.algorithms = list(algorithms)

    def verify(self, token: str) -> tuple[str, frozenset[str]]:
        jwt = self._jwt
        try:
            key = self._keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"identity token not valid: {e}") from None
        name = claims.get(self.username_claim)
        if not isinstance(name, str) or not name:
            raise Unauthenticated(f"identity token has no {self.username_claim!r} claim")
        groups = claims.get(self.groups_claim) or ()
        return name, frozenset(g for g in groups if isinstance(g, str))


# -- the head node's Unix socket ----------------------------------------------------------

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel tells it."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)[1]


def auth_socket_path(api_socket: str | os.PathLike[str]) -> Path:
    """Where the session-token socket lives, beside the API socket `api_socket`."""
    path = Path(api_socket)
    return path.with_name(path.stem + "-auth" + path.suffix)


class PeerCredIssuer:
    """A Unix socket anyone on the head node may connect to: the kernel says who connected
    (SO_PEERCRED) and the daemon answers with a session token for that account, one JSON line.
    """

    def __init__(
        self,
        path: Path,
        sessions: SessionBook,
        roles: RolePolicy,
        *,
        admin_uids: frozenset[int] = frozenset({0}),
    ) -> None:
        self.path = path
        self.sessions = sessions
        self.roles = roles
        self.admin_uids = admin_uids | {os.geteuid()}
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)  # everyone may ask; the answer is their own identity
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="auth-socket", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def principal_for(self, uid: int) -> Principal:
        entry = pwd.getpwuid(uid)  # KeyError: an account the head node does not know
        name = entry.pw_name
        role = (
            Role.ADMIN if uid in self.admin_uids else self.roles.role_of(name, account_groups(name))
        )
        return Principal(name=name, role=role, via="unix", uid=uid)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    conn.sendall(self._answer(peer_uid(conn)).encode() + b"\n")
                except OSError:
                    continue

    def _answer(self, uid: int) -> str:
        try:
            who = self.principal_for(uid)
        except KeyError:
            return json.dumps({"error": f"uid {uid} has no account on this host"})
        token = self.sessions.issue(who)
        return json.dumps(
            {
                "token": token,
                "user": who.name,
                "role": who.role.value,
                "expires_in": self.sessions.ttl_s,
            }
        )


def fetch_session(path: str | os.PathLike[str], timeout: float = 5.0) -> Mapping[str, Any]:
    """Ask the daemon's auth socket who we are: {"token", "user", "role", "expires_in"}."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        data = b""
        while not data.endswith(b"\n") and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"{}")
    if "error" in answer or "token" not in answer:
        raise PermissionError(answer.get("error", "the auth socket gave no token"))
    return answer
