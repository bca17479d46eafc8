"""Who may do what: roles and the permissions they grant, the principals requests act as,
API tokens and audit records as values, and the rules for which account a rank may run as.

Pure decisions only: where a principal comes from (the kernel, a token, a certificate) is the
API layer's business (`api/auth.py`); the agent checks the same run-as rules again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from gpuctl.core.errors import GpuctlError


class Role(enum.StrEnum):
    USER = "user"
    OPERATOR = "operator"
    ADMIN = "admin"
    NODE = "node"  # an agent, acting for its own node only
    JOINING = "joining"  # an agent with a one-time join token: it may only ask for its cert


class Permission(enum.StrEnum):
    JOBS_SUBMIT = "jobs.submit"
    JOBS_OWN = "jobs.own"  # read, watch, cancel and read logs of one's own jobs
    JOBS_ALL = "jobs.all"  # the same for everyone's jobs (env values of others stay hidden)
    NODES_READ = "nodes.read"
    NODES_MANAGE = "nodes.manage"  # drain, undrain, node credentials
    LEASES_READ = "leases.read"
    COST_ALL = "cost.all"  # site-wide cost, idle leases included
    TOKENS_OWN = "tokens.own"  # API tokens for oneself
    TOKENS_ALL = "tokens.all"  # API tokens for anyone
    AUDIT_READ = "audit.read"
    AGENT = "agent"  # the agent API, for the caller's own node
    JOIN = "join"  # trade a join token for the node's certificate


_USER = frozenset(
    {
        Permission.JOBS_SUBMIT,
        Permission.JOBS_OWN,
        Permission.NODES_READ,
        Permission.TOKENS_OWN,
    }
)
_OPERATOR = _USER | {
    Permission.JOBS_ALL,
    Permission.NODES_MANAGE,
    Permission.LEASES_READ,
    Permission.COST_ALL,
    Permission.AUDIT_READ,
}
ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.USER: _USER,
    Role.OPERATOR: _OPERATOR,
    Role.ADMIN: _OPERATOR | {Permission.TOKENS_ALL},
    Role.NODE: frozenset({Permission.AGENT}),
    Role.JOINING: frozenset({Permission.JOIN}),
}


class Unauthenticated(GpuctlError):
    """No credentials, or credentials that do not check out."""


class PermissionDenied(GpuctlError, PermissionError):
    """The caller is known but may not do this; `permission` names what is missing."""

    def __init__(self, message: str, *, permission: str = "") -> None:
        self.permission = permission
        super().__init__(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Whom a request acts for: a person (by account name) or a node (by node name)."""

    name: str
    role: Role
    via: str  # how it was established: unix, token, oidc, node-token, join-token, cert
    uid: int | None = None  # the kernel's word, where the caller came through the Unix socket
    credential: str = ""  # the id of the token or certificate, where one was used

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def require(self, permission: Permission) -> None:
        if not self.can(permission):
            raise PermissionDenied(
                f"{self.role.value} {self.name!r} lacks permission {permission.value}",
                permission=permission.value,
            )

    def owns(self, owner: str) -> bool:
        """True where the caller may act on an object `owner` holds (their own, or all)."""
        return owner == self.name or self.can(Permission.JOBS_ALL)


@dataclass(frozen=True, slots=True, kw_only=True)
class RolePolicy:
    """Which people are operators and admins: by account name or by group."""

    admins: frozenset[str] = frozenset()
    operators: frozenset[str] = frozenset()
    admin_groups: frozenset[str] = frozenset()
    operator_groups: frozenset[str] = frozenset()

    def role_of(self, name: str, groups: frozenset[str] = frozenset()) -> Role:
        if name in self.admins or groups & self.admin_groups:
            return Role.ADMIN
        if name in self.operators or groups & self.operator_groups:
            return Role.OPERATOR
        return Role.USER


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueGrants:
    """Queues whose jobs their members see and act on as on their own (a team's queue), by
    account name or group. Env values of others' jobs stay hidden all the same."""

    members: Mapping[str, frozenset[str]] = field(default_factory=dict)
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.members or self.groups)

    def queues_of(self, name: str, groups: frozenset[str] = frozenset()) -> frozenset[str]:
        queues = {q for q, names in self.members.items() if name in names}
        queues |= {q for q, granted in self.groups.items() if granted & groups}
        return frozenset(queues)


class TokenKind(enum.StrEnum):
    USER = "user"  # an API token: acts as its user, with the user's role
    NODE = "node"  # an agent's credential, bound to one node name
    JOIN = "join"  # one use: an agent trades it for a certificate naming its node
    CERT = "cert"  # a node certificate gpuctld's CA issued (id: its serial); never a bearer


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiToken:
    """A token the daemon issued; only a hash of its secret is kept."""

    id: str  # public part, shown by `gpuctl token list`
    kind: TokenKind
    principal: str  # the user, or the node name
    secret_hash: str
    description: str = ""
    created_by: str = ""
    created_at: datetime | None = None
    expires_at: datetime | None = None  # None: never
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One mutating call: who did what to which object, when and from where."""

    time: datetime
    principal: str
    role: str
    via: str
    peer: str
    action: str  # the RPC, e.g. CancelJob
    target: str  # jobs/42, nodes/a, tokens/ab12
    outcome: str  # "ok", or the status code name
    detail: str = ""
    id: int = 0


# Accounts that exist on every Linux system to run services, never people's jobs.
DEFAULT_DENIED_ACCOUNTS = frozenset(
    {
        "root",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "gnats",
        "_apt",
        "systemd-network",
        "systemd-resolve",
        "messagebus",
        "sshd",
        "postgres",
        "mysql",
        "redis",
        "gpuctl",
        "nobody",  # the agent's fallback account: shared by everyone who has none
    }
)
DEFAULT_MIN_UID = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class RunAsPolicy:
    """Which account a person's ranks run as, and which accounts never run jobs.

    `allow` names accounts let through whatever their uid (the demo's own user); `map` sends a
    principal to another account (a site whose identity provider names people differently).
    """

    min_uid: int = DEFAULT_MIN_UID
    deny: frozenset[str] = DEFAULT_DENIED_ACCOUNTS
    allow: frozenset[str] = frozenset()
    map: Mapping[str, str] = field(default_factory=dict)

    def account_for(self, principal: str) -> str:
        return self.map.get(principal, principal)

    def refusal(self, account: str, uid: int | None) -> str:
        """Why `account` (with `uid` where known) may not run jobs; "" when it may."""
        if account in self.allow:
            return ""
        if account in self.deny:
            return f"account {account!r} is a system account and never runs jobs"
        if uid is not None and uid < self.min_uid:
            return f"account {account!r} has uid {uid}, below min_uid {self.min_uid}"
        return ""


SECRET_SHOWN_AS = "<secret>"
HIDDEN_SHOWN_AS = "<hidden>"


def visible_env(
    env: Mapping[str, str], user_keys: frozenset[str], secret_keys: frozenset[str], *, owner: bool
) -> dict[str, str]:
    """`env` as a viewer may see it: secret values for no one, the user's own values only for
    the job's owner; what gpuctl itself set (the launch contract) for everyone who may look."""
    shown = {}
    for key, value in env.items():
        if key in secret_keys:
            shown[key] = SECRET_SHOWN_AS
        elif key in user_keys and not owner:
            shown[key] = HIDDEN_SHOWN_AS
        else:
            shown[key] = value
    return shown
