"""The `gpuctl` commands: submit, jobs, describe, logs, cancel, nodes, drain, leases, cost.

Each command is a thin shell over `gpuctl.client.Client`; expected failures (a bad spec, an
unknown job, an unreachable daemon) print one `error:` line on stderr and exit 1.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from gpuctl.cli import contexts, render
from gpuctl.cli.simulate import simulate
from gpuctl.client import (
    DEFAULT_SOCKET,
    DEFAULT_TARGET,
    ApiError,
    Client,
    JobFileError,
    UnavailableError,
    auth_pb2,
    jobs_pb2,
    load_job_mapping,
    parse_duration,
    spec_from_mapping,
)
from gpuctl.core.errors import FieldViolation, GpuctlError

_JOB_REF = re.compile(r"^(jobs/)?\d+$")
_ACTIVE = ("pending", "running", "cancelling")
# Jobs a list asks for a page: the most the API gives. A long queue comes in fewer round trips
# (30,000 jobs: 0.4-0.5 s instead of 0.7 s, the server's views built).
LIST_PAGE = 1000
_STATES = (
    "pending",
    "running",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
    "timeout",
    "node-lost",
)
_OUTPUT = click.Choice(["table", "wide", "json", "yaml"])


class _Gpuctl(click.Group):
    """Turns the errors a user can cause or fix into one line on stderr, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ApiError, GpuctlError) as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except OSError as e:  # a job file that exists but cannot be read
            click.echo(f"error: cannot read {e.filename or 'input'}: {e.strerror or e}", err=True)
            ctx.exit(1)


class _Settings:
    def __init__(
        self,
        server: str | None,
        timeout: float,
        ca_file: str | None,
        token_file: str | None,
        context: str | None = None,
    ) -> None:
        # A flag (or its environment variable) wins over the context, as with kubectl.
        chosen = contexts.resolve(context)
        self.context = chosen.name if chosen is not None else None
        self.server = server or (chosen.server if chosen is not None else None) or None
        self.timeout = timeout
        self.ca_file = ca_file or (chosen.ca_file if chosen is not None else None) or None
        self.token_file = token_file or (chosen.token_file if chosen is not None else None) or None
        self._client: Client | None = None

    def client(self, ctx: click.Context) -> Client:
        if self._client is None:
            token = None
            if self.token_file:
                try:
                    with open(self.token_file, encoding="utf-8") as f:
                        token = f.read().strip()
                except OSError as e:
                    raise click.BadParameter(
                        f"cannot read {self.token_file}: {e.strerror}", param_hint="--token-file"
                    ) from None
            try:
                self._client = Client(
                    self.server, token=token, ca_file=self.ca_file, timeout=self.timeout
                )
            except ValueError as e:  # no address in it (--server or $GPUCTL_SERVER)
                raise click.BadParameter(str(e), param_hint="--server") from None
            ctx.call_on_close(self._client.close)
        return self._client


def _client(ctx: click.Context) -> Client:
    return ctx.find_object(_Settings).client(ctx.find_root())


def _now() -> datetime:
    return datetime.now(UTC)


def _terminal() -> tuple[bool, int | None]:
    """Whether to colour stdout, and the width to cut table lines to: a terminal's, neither
    when stdout is a pipe or a file. NO_COLOR (any value) turns colour off, as TERM=dumb."""
    if not sys.stdout.isatty():
        return False, None
    colour = "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    return colour, shutil.get_terminal_size().columns


def _completion_client(ctx: click.Context) -> Client | None:
    """A client from the flags typed so far, for completing names; None when it cannot be
    made. Completion never waits long or prints an error into the user's command line."""
    params = ctx.find_root().params
    try:
        s = _Settings(
            params.get("server"),
            2.0,
            params.get("ca_file"),
            params.get("token_file"),
            params.get("context"),
        )
        token = None
        if s.token_file:
            with open(s.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        return Client(s.server, token=token, ca_file=s.ca_file, timeout=2)
    except (OSError, ValueError, GpuctlError, ApiError):
        return None


def _complete_jobs(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list:
    from click.shell_completion import CompletionItem

    client = _completion_client(ctx)
    if client is None:
        return []
    try:
        with client:
            found = list(client.list(states=list(_ACTIVE), page_size=LIST_PAGE))
    except (ApiError, GpuctlError):
        return []
    return [
        CompletionItem(
            str(j.id), help=f"{j.spec.name or j.spec.kind} ({render.job_state(j.state)})"
        )
        for j in found
        if str(j.id).startswith(incomplete.removeprefix("jobs/"))
    ]


def _complete_nodes(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list:
    from click.shell_completion import CompletionItem

    client = _completion_client(ctx)
    if client is None:
        return []
    try:
        with client:
            found = client.nodes()
    except (ApiError, GpuctlError):
        return []
    return [
        CompletionItem(n.name, help=render.node_state(n.state))
        for n in found
        if n.name.startswith(incomplete)
    ]


@click.group(cls=_Gpuctl, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="GPUCTL_SERVER",
    default=None,
    help="gpuctld: unix:/PATH or HOST:PORT; where several run (a leader and standbys), "
    "HOST:PORT,HOST:PORT... and calls go to the leader (env GPUCTL_SERVER; default "
    f"unix:{DEFAULT_SOCKET} where it exists, else {DEFAULT_TARGET}).",
)
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for each call."
)
@click.option(
    "--ca-file",
    envvar="GPUCTL_CA_FILE",
    type=click.Path(dir_okay=False),
    help="Speak TLS to HOST:PORT, trusting this CA (env GPUCTL_CA_FILE).",
)
@click.option(
    "--token-file",
    envvar="GPUCTL_TOKEN_FILE",
    type=click.Path(dir_okay=False),
    help="Read the API token from this file (or set GPUCTL_TOKEN); not needed on the "
    "head node's socket.",
)
@click.option(
    "--context",
    envvar="GPUCTL_CONTEXT",
    help="Use this context of the config file (`gpuctl config get-contexts`) instead of the "
    "current one (env GPUCTL_CONTEXT).",
)
@click.version_option(package_name="gpuctl")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str | None,
    timeout: float,
    ca_file: str | None,
    token_file: str | None,
    context: str | None,
) -> None:
    """gpuctl: queue training gangs and inference services on leased GPU nodes."""
    if ctx.invoked_subcommand == "config":
        return  # editing the contexts needs none of them to be valid
    ctx.obj = _Settings(server, timeout, ca_file, token_file, context)


# -- submit -------------------------------------------------------------------------------


def _env_pairs(values: tuple[str, ...], flag: str = "--env") -> dict[str, str]:
    out = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq:  # `--env HF_TOKEN` passes the local value through, as docker run -e does
            if key not in os.environ:
                raise click.BadParameter(
                    f"{item!r}: expected NAME=VALUE, or the name of a set variable",
                    param_hint=flag,
                )
            value = os.environ[key]
        out[key] = value
    return out


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-f",
    "--file",
    "job_file",
    type=click.Path(dir_okay=False, allow_dash=True, exists=True),
    help="YAML job file ('-': stdin); flags given too override its fields.",
)
@click.option(
    "--kind",
    type=click.Choice(["training", "inference"]),
    help="A training gang or inference replicas.",
)
@click.option("--name", help="A name for people to read.")
@click.option("--queue", help="Queue to wait in (default: default).")
@click.option("--priority", type=int, help="Higher goes first.")
@click.option("--nodes", type=int, help="Training: nodes in the gang.")
@click.option(
    "--gpus-per-node", type=int, help="GPUs per node (inference: whole GPUs per replica)."
)
@click.option("--replicas", type=int, help="Inference: independent replicas.")
@click.option(
    "--gpu-share", type=float, help="Inference: a share of one GPU per replica, 0 < x < 1."
)
@click.option("--gpu-memory", help="GPU memory per replica, e.g. 40GiB or 80G.")
@click.option(
    "--gpu-model",
    help="Only this GPU model, e.g. 'H100 SXM'; or any of several: 'A100 80GB,H100 SXM'.",
)
@click.option("--cpus", help="CPU cores per rank/replica (or millicores, '500m').")
@click.option("--memory", help="Host memory per rank/replica, e.g. 64GiB.")
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a variable (repeatable); NAME alone passes yours on.",
)
@click.option(
    "--secret-env",
    "secret_env",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a secret variable: the ranks get it, nobody sees it after submission. "
    "NAME alone passes yours on (keeps the value off the command line).",
)
@click.option("--time-limit", help="Stop after this long: seconds, 30m, 2h, 1h30m, 1-00:00:00.")
@click.option("--min-nvlink-gbps", type=float, help="Training: NVLink floor per GPU, GB/s.")
@click.option("--min-net-gbps", type=float, help="Training: inter-node network floor, Gb/s.")
@click.option(
    "--on-node-lost",
    type=click.Choice(["requeue", "fail"]),
    help="What a lost node does to the job.",
)
@click.option(
    "--restart-policy",
    type=click.Choice(["always", "on-failure", "never"]),
    help="Inference: what replaces a replica that ends (default on-failure).",
)
@click.option(
    "--spread",
    type=click.Choice(["node", "fabric", "none"]),
    help="Inference: one replica to a node where the cheapest nodes allow (default), one to a "
    "fabric first, or packed.",
)
@click.option(
    "--preemptible/--no-preemptible",
    default=None,
    help="May be stopped and requeued for higher priority work.",
)
@click.option("--workdir", help="Directory the ranks start in (default: this one).")
@click.option(
    "--request-id", help="Idempotency key: submitting again with it returns the same job."
)
@click.option("--parsable", is_flag=True, help="Print only the job id.")
@click.option("--dry-run", is_flag=True, help="Check the spec with the server; submit nothing.")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the job to end, showing its progress on stderr; exit with its exit code "
    "(0 succeeded; 124 timeout, 130 cancelled, 69 node lost).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def submit(
    ctx: click.Context,
    job_file: str | None,
    env: tuple[str, ...],
    secret_env: tuple[str, ...],
    command: tuple[str, ...],
    workdir: str | None,
    request_id: str | None,
    parsable: bool,
    dry_run: bool,
    wait: bool,
    **flags: Any,
) -> None:
    """Queue a job: gpuctl submit --kind training --nodes 2 --gpus-per-node 8 -- torchrun train.py"""
    data: dict[str, Any] = load_job_mapping(job_file) if job_file else {}
    for key, value in flags.items():
        if value is not None:
            data[key] = value
    if env:
        base = data.get("env")
        data["env"] = {**(base if isinstance(base, Mapping) else {}), **_env_pairs(env)}
    if secret_env:
        base = data.get("secret_env")
        data["secret_env"] = {
            **(base if isinstance(base, Mapping) else {}),
            **_env_pairs(secret_env, "--secret-env"),
        }
    if command:
        data["command"] = list(command)
    if workdir is not None:
        data["working_dir"] = os.path.abspath(workdir)
    elif not data.get("working_dir"):
        data["working_dir"] = os.getcwd()
    source = "<stdin>" if job_file == "-" else job_file or ""
    from_flags = {k for k, v in flags.items() if v is not None}
    from_flags |= {k for k, given in (("env", env), ("secret_env", secret_env)) if given}
    from_flags |= {"command"} if command else set()
    from_flags |= {"working_dir"} if workdir is not None or not job_file else set()
    try:
        spec = spec_from_mapping(data, source=source, check=True)
    except JobFileError as e:
        raise _as_typed(e, from_flags, source) from None

    client = _client(ctx)
    if dry_run:
        job = client.submit(spec, request_id=request_id, validate_only=True)
        click.echo("Job spec is valid; nothing was submitted (dry run).")
        click.echo(f"  {render.spec_summary(job.spec)}")
        if job.reason:
            click.echo(f"  {job.reason}")
        return
    job = client.submit(spec, request_id=request_id)
    click.echo(str(job.id) if parsable else f"Submitted job {job.id}")
    if not wait:
        return
    shown: list[str] = []

    def progress(update: jobs_pb2.Job) -> None:  # each change of what it is doing, on stderr
        line = f"job {update.id} {render.job_state(update.state)}"
        where = render.job_nodes(update)
        if update.state == jobs_pb2.JOB_STATE_RUNNING and where:
            line += f" on {','.join(where)}"
        if update.reason:
            line += f": {update.reason}"
        if not shown or shown[-1] != line:
            shown.append(line)
            click.echo(line, err=True)

    final = client.wait(job, on_change=progress)
    line = f"job {final.id} {render.job_state(final.state)}"
    if final.HasField("exit_code"):
        line += f" (exit code {final.exit_code})"
    if final.reason:
        line += f": {final.reason}"
    click.echo(line, err=parsable)  # --parsable keeps stdout to the id
    ctx.exit(wait_exit_code(final))


# The flag of each job-file key where they differ from `--` + the key with '-' for '_'.
_FLAG_OF = {"working_dir": "--workdir", "command": "COMMAND"}


def _as_typed(error: JobFileError, from_flags: set[str], source: str) -> JobFileError:
    """`error` with each field a flag gave named as that flag (--cpus), the rest as the job
    file's keys under the file's name: what the user typed, either way."""
    out = []
    for v in error.violations:
        key = re.split(r"[.\[]", v.field, maxsplit=1)[0]
        rest = v.field[len(key) :]
        if key in from_flags:
            flag = _FLAG_OF.get(key, "--" + key.replace("_", "-"))
            # env.HF_TOKEN -> "--env HF_TOKEN", as it was typed
            out.append(
                FieldViolation(flag + (" " + rest[1:] if rest[:1] == "." else rest), v.description)
            )
        else:
            out.append(FieldViolation(f"{source}: {v.field}" if source else v.field, v.description))
    return JobFileError(out)


# What `submit --wait` exits with, per end state (README, "Exit codes").
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_CANCELLED = 130
EXIT_NODE_LOST = 69  # EX_UNAVAILABLE


def wait_exit_code(job: jobs_pb2.Job) -> int:
    """0 for a job that succeeded; a failed job's own exit code (128 + N when killed by signal
    N, 1 when unknown); 124 timeout, 130 cancelled, 69 node lost."""
    if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        return 0
    if job.state == jobs_pb2.JOB_STATE_TIMEOUT:
        return EXIT_TIMEOUT
    if job.state == jobs_pb2.JOB_STATE_CANCELLED:
        return EXIT_CANCELLED
    if job.state == jobs_pb2.JOB_STATE_NODE_LOST:
        return EXIT_NODE_LOST
    code = job.exit_code if job.HasField("exit_code") else 1
    if code < 0:
        return min(128 - code, 255)
    return code if 0 < code < 256 else 1


# -- jobs, describe, logs, cancel ---------------------------------------------------------


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Finished jobs too.")
@click.option(
    "--state",
    "states",
    multiple=True,
    metavar="STATE[,STATE]",
    help=f"Only these states ({', '.join(_STATES)}).",
)
@click.option("--queue", default="", help="Only this queue.")
@click.option("-u", "--owner", default="", help="Only this user's jobs.")
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.option(
    "-w",
    "--watch",
    is_flag=True,
    help="After the list, print each job again as it changes, until interrupted (Ctrl-C).",
)
@click.pass_context
def jobs(
    ctx: click.Context,
    show_all: bool,
    states: tuple[str, ...],
    queue: str,
    owner: str,
    output: str,
    watch: bool,
) -> None:
    """List jobs, like squeue: the active ones unless --all or --state."""
    wanted = _split(states)
    for s in wanted:
        if s.lower() not in _STATES:
            raise click.BadParameter(
                f"{s!r} is not one of {', '.join(_STATES)}", param_hint="--state"
            )
    if not wanted and not show_all:
        wanted = list(_ACTIVE)
    client = _client(ctx)
    found = list(
        client.list(
            states=[s.lower() for s in wanted], queue=queue, owner=owner, page_size=LIST_PAGE
        )
    )
    colour, width = _terminal()

    def rows(jobs: list, header: bool) -> str:
        wide = output == "wide"
        return render.jobs_table(
            jobs, now=_now(), wide=wide, colour=colour, width=width, header=header
        )

    _emit(found, output, lambda _: rows(found, True))
    if not watch:
        return
    # As `kubectl get -w`: each change is a line (or document) of its own, from the revision
    # the list was read at, for the jobs the filters select, until the user stops it.
    since = max((j.revision for j in found), default=0)
    shown = {j.id for j in found}
    for job in _watch(client, since):
        selected = render.job_state(job.state).replace("_", "-") in wanted or not wanted
        if (queue and job.spec.queue != queue) or (owner and job.owner != owner):
            continue
        if not selected and job.id not in shown:
            continue
        shown.add(job.id)
        _emit([job], output, lambda _, job=job: rows([job], False), stream=True)


def _watch(client: Client, since: int):
    """Every job change after revision `since`, riding out a daemon that restarts or a
    stream the server ends (as `Client.wait` does)."""
    backoff = 0.1
    while True:
        try:
            for job in client.watch(since_revision=since):
                since = max(since, job.revision)
                backoff = 0.1
                yield job
        except UnavailableError:
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


def _emit(messages: list, output: str, as_table, *, stream: bool = False) -> None:
    """`messages` as a table, or as JSON or YAML documents: a list (or, with `stream`, one
    document per message: a JSON object a line, YAML documents apart by ---)."""
    if output in ("json", "yaml"):
        docs = [render.document(m) for m in messages]
        if not stream:
            click.echo(render.dump(docs, output))
        for doc in docs if stream else ():
            if output == "json":
                click.echo(json.dumps(doc))
            else:
                click.echo("---\n" + render.dump(doc, "yaml"))
    else:
        click.echo(as_table(output == "wide"))


@cli.command()
@click.argument("what")
@click.option(
    "-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text", show_default=True
)
@click.pass_context
def describe(ctx: click.Context, what: str, output: str) -> None:
    """Show a job (42 or jobs/42) or a node (its name) in detail."""
    client = _client(ctx)
    if _JOB_REF.match(what):
        obj: Any = client.get(what)
        text = render.describe_job(obj, now=_now()) if output == "text" else ""
    else:
        obj = client.node(what)
        text = render.describe_node(obj, now=_now()) if output == "text" else ""
    if output != "text":  # one resource: one object
        text = render.dump(render.document(obj), output)
    click.echo(text)


@cli.command()
@click.argument("kind", type=click.Choice(["job", "jobs", "node", "nodes"]))
@click.argument("names", nargs=-1)
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.pass_context
def get(ctx: click.Context, kind: str, names: tuple[str, ...], output: str) -> None:
    """Show jobs or nodes, as kubectl get: `gpuctl get job 7 -o yaml` (one name: one object,
    which `gpuctl submit -f` takes back); without names, the active jobs or every node."""
    client = _client(ctx)
    if kind.startswith("job"):
        for name in names:
            if not _JOB_REF.match(name):
                raise click.BadParameter(f"{name!r} is not a job id like 42", param_hint="NAMES")
        found = (
            [client.get(n) for n in names]
            if names
            else list(client.list(states=list(_ACTIVE), page_size=LIST_PAGE))
        )
        colour, width = _terminal()

        def as_table(wide: bool) -> str:
            return render.jobs_table(found, now=_now(), wide=wide, colour=colour, width=width)
    else:
        found = [client.node(n) for n in names] if names else client.nodes()
        colour, width = _terminal()

        def as_table(wide: bool) -> str:
            return render.nodes_table(found, wide=wide, colour=colour, width=width)

    if len(names) == 1 and output in ("json", "yaml"):
        click.echo(render.dump(render.document(found[0]), output))
        return
    _emit(found, output, as_table)


@cli.command()
@click.argument("job", shell_complete=_complete_jobs)
@click.option(
    "--rank",
    type=click.IntRange(0, 2**31 - 1),  # an int32 on the wire
    default=0,
    show_default=True,
    help="Which rank (training) or replica (inference).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job ends.")
@click.option(
    "--tail",
    type=click.IntRange(0, None),
    metavar="N",
    help="Only the last N lines of each rank's log so far (then what follows, with -f).",
)
@click.option(
    "--all-ranks",
    is_flag=True,
    help="Every rank (or replica) of the job, each line prefixed with its rank: [rank 2].",
)
@click.option(
    "--timestamps",
    is_flag=True,
    help="Begin each line with when gpuctld received it (UTC, to the millisecond; within a "
    "second of when the rank wrote it).",
)
@click.pass_context
def logs(
    ctx: click.Context,
    job: str,
    rank: int,
    follow: bool,
    tail: int | None,
    all_ranks: bool,
    timestamps: bool,
) -> None:
    """Print a rank's combined stdout and stderr."""
    client = _client(ctx)
    if not all_ranks:
        for chunk in _rank_log(client, job, rank, follow, tail, timestamps):
            click.echo(chunk, nl=False)  # bytes go to the binary stdout as they are, and flush
        return
    found = client.get(job)
    ranks = sorted({r.rank for r in found.placement.ranks})
    if not ranks:
        raise click.UsageError(f"job {found.id} has no ranks yet: it has not been placed")
    if not follow:
        for n in ranks:
            for line in _lines(_rank_log(client, job, n, False, tail, timestamps)):
                click.echo(f"[rank {n}] ".encode() + line, nl=False)
        return
    # Following several ranks: one stream each, their whole lines interleaved as they come.
    lines: deque[tuple[int, bytes] | BaseException | None] = deque()
    arrived = threading.Condition()

    def follow_rank(n: int) -> None:
        end: BaseException | None = None
        try:
            for line in _lines(_rank_log(client, job, n, True, tail, timestamps)):
                with arrived:
                    lines.append((n, line))
                    arrived.notify()
        except (ApiError, GpuctlError) as e:  # said by the main thread, as one error line
            end = e
        finally:
            with arrived:
                lines.append(end)
                arrived.notify()

    for n in ranks:
        threading.Thread(target=follow_rank, args=(n,), daemon=True).start()
    running = len(ranks)
    unended = False  # the last line shown was a rank's last, with no newline
    while running:
        with arrived:
            arrived.wait_for(lambda: bool(lines))
            item = lines.popleft()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            running -= 1
        else:
            if unended:  # another rank's line follows it: it starts on a line of its own
                click.echo(b"\n", nl=False)
            click.echo(f"[rank {item[0]}] ".encode() + item[1], nl=False)
            unended = not item[1].endswith(b"\n")


def _rank_log(
    client: Client, job: str, rank: int, follow: bool, tail: int | None, stamps: bool = False
) -> Iterator[bytes]:
    """One rank's log as bytes; with `stamps`, each line begun by when gpuctld received it;
    with `tail`, from N lines before its end."""

    def chunks(follow: bool, offset: int) -> Iterator[jobs_pb2.LogChunk]:
        return client.log_chunks(job, rank=rank, follow=follow, offset=offset, timestamps=stamps)

    if tail is None:
        yield from _dated(chunks(follow, 0), stamps)
        return
    kept: deque[bytes] = deque(maxlen=tail or None)
    end = [0, b"\n"]  # the offset after the last chunk read, and its last byte

    def noting(found: Iterator[jobs_pb2.LogChunk]) -> Iterator[jobs_pb2.LogChunk]:
        for chunk in found:
            end[:] = [chunk.offset + len(chunk.data), chunk.data[-1:] or end[1]]
            yield chunk

    for line in _lines(_dated(noting(chunks(False, 0)), stamps)):
        if tail:
            kept.append(line)
    yield from kept
    if follow:
        yield from _dated(chunks(True, end[0]), stamps, at_line_start=end[1] == b"\n")


def _dated(
    chunks: Iterable[jobs_pb2.LogChunk], stamps: bool, *, at_line_start: bool = True
) -> Iterator[bytes]:
    """The chunks' bytes; with `stamps`, each line begun by its chunk's time, as kubectl logs
    --timestamps does (2026-12-07T14:05:01.123Z; "-" where gpuctld has no time for it)."""
    for chunk in chunks:
        if not stamps:
            yield chunk.data
            continue
        stamp = (
            chunk.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")[:-6] + "Z "
            if chunk.HasField("time")
            else "- "
        ).encode()
        out = []
        for line in chunk.data.splitlines(keepends=True):
            out.append(stamp + line if at_line_start else line)
            at_line_start = line.endswith(b"\n")
        yield b"".join(out)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Chunks of bytes as lines (each with its newline; a last line without one as it is)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if rest:
        yield rest


@cli.command()
@click.argument("job", shell_complete=_complete_jobs)
@click.option(
    "-f",
    "--file",
    "job_file",
    required=True,
    help="The service's new job file (YAML; - for stdin).",
)
@click.pass_context
def update(ctx: click.Context, job: str, job_file: str) -> None:
    """Roll an inference service to a new spec: gpuctl update 42 -f serve-v2.yaml"""
    source = "<stdin>" if job_file == "-" else job_file
    data = load_job_mapping(job_file)
    data.setdefault("working_dir", os.getcwd())  # as submit does
    updated = _client(ctx).update(job, spec_from_mapping(data, source=source, check=True))
    line = f"job {updated.id} updated"
    click.echo(f"{line}: {updated.reason}" if updated.reason else line)


@cli.command()
@click.argument("job", shell_complete=_complete_jobs)
@click.option(
    "--replicas", type=click.IntRange(min=1), required=True, help="The desired replica count."
)
@click.pass_context
def scale(ctx: click.Context, job: str, replicas: int) -> None:
    """Set an inference job's replicas: gpuctl scale 42 --replicas 6"""
    scaled = _client(ctx).scale(job, replicas)
    line = f"job {scaled.id} scaled to {replicas} replica{'s' * (replicas != 1)}"
    click.echo(f"{line}: {scaled.reason}" if scaled.reason else line)


@cli.command()
@click.argument(
    "job_refs", nargs=-1, required=True, metavar="JOB...", shell_complete=_complete_jobs
)
@click.pass_context
def cancel(ctx: click.Context, job_refs: tuple[str, ...]) -> None:
    """Cancel jobs; a failure on one does not stop the others."""
    client = _client(ctx)
    failed = False
    for ref in job_refs:
        try:
            job = client.cancel(ref)
        except UnavailableError as e:  # the daemon, not this job: the rest would fail the same
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except ApiError as e:
            click.echo(f"error: {e}", err=True)
            failed = True
            continue
        click.echo(f"job {job.id} {render.job_state(job.state)}")
    ctx.exit(1 if failed else 0)


# -- nodes and leases ---------------------------------------------------------------------


NODES_WATCH_POLL_S = 2.0


@cli.command()
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.option(
    "-w",
    "--watch",
    is_flag=True,
    help="After the list, print each node again as it changes (state, free GPUs, profile), "
    f"polled every {NODES_WATCH_POLL_S:g} s, until interrupted (Ctrl-C).",
)
@click.pass_context
def nodes(ctx: click.Context, output: str, watch: bool) -> None:
    """List nodes with their measured bandwidth, lease price and free GPUs."""
    client = _client(ctx)
    found = client.nodes()
    colour, width = _terminal()

    def rows(nodes: list, header: bool) -> str:
        return render.nodes_table(
            nodes, wide=output == "wide", colour=colour, width=width, header=header
        )

    _emit(found, output, lambda _: rows(found, True))

    def shown(node) -> str:  # what a row shows of it (a heartbeat alone is no change)
        return render.nodes_table([node], wide=True, header=False)

    seen = {n.name: shown(n) for n in found}
    while watch:
        time.sleep(NODES_WATCH_POLL_S)
        try:
            now = client.nodes()
        except UnavailableError:
            continue
        changed = [n for n in now if seen.get(n.name) != shown(n)]
        seen = {n.name: shown(n) for n in now}
        if changed:
            _emit(changed, output, lambda _, c=changed: rows(c, False), stream=True)


DRAIN_POLL_S = 2.0


@cli.command()
@click.argument("node", shell_complete=_complete_nodes)
@click.option("--reason", default="", help="Why, for `gpuctl describe`.")
@click.option(
    "--wait", "wait_", is_flag=True, help="Wait until no job holds GPUs on the node any more."
)
@click.pass_context
def drain(ctx: click.Context, node: str, reason: str, wait_: bool) -> None:
    """Stop new work landing on a node; what runs there finishes."""
    client = _client(ctx)
    drained = client.drain(node, reason=reason)
    click.echo(f"node {drained.name} {render.node_state(drained.state)}")
    shown: list[int] | None = None
    while wait_:
        jobs = sorted({j for u in client.node(node).usage for j in u.job_ids})
        if not jobs:
            click.echo(f"node {drained.name}: no job runs there any more")
            return
        if jobs != shown:
            click.echo(f"waiting for job(s) {', '.join(map(str, jobs))}", err=True)
            shown = jobs
        time.sleep(DRAIN_POLL_S)


@cli.command()
@click.argument("node", shell_complete=_complete_nodes)
@click.pass_context
def undrain(ctx: click.Context, node: str) -> None:
    """Let new work land on a drained node again."""
    back = _client(ctx).undrain(node)
    click.echo(f"node {back.name} {render.node_state(back.state)}")


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Released and expired leases too.")
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.pass_context
def leases(ctx: click.Context, show_all: bool, output: str) -> None:
    """List the node leases gpuctl holds and what they cost."""
    found = _client(ctx).leases(include_released=show_all)
    _emit(found, output, lambda wide: render.leases_table(found, now=_now()))


_MAX_SINCE = timedelta(days=100 * 365)  # gpuctl is younger; the server refuses times before 1970
# The times the server accepts (api.convert.from_ts); the CLI may import only the SDK and core.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(2201, 1, 1, tzinfo=UTC)


def _since(value: str | None) -> datetime | timedelta | None:
    """`--since`: a duration back from now (90m, 24h, 7d, 1h30m) or a time (ISO 8601, UTC
    unless it says otherwise)."""
    if not value:
        return None
    text = value.strip()
    match = re.fullmatch(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", text.lower())
    if text and match and any(match.groups()):
        # Summed as ints and checked before timedelta() sees them: a typo such as 99999999999d
        # would overflow it, or the subtraction from now, into a traceback.
        digits = max(len(g or "") for g in match.groups())
        days, hours, minutes, seconds = (int(g[:12]) if g else 0 for g in match.groups())
        back_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        if digits > 12 or back_s > _MAX_SINCE.total_seconds():
            raise click.BadParameter(
                f"{value!r}: at most {_MAX_SINCE.days} days back", param_hint="--since"
            )
        return timedelta(seconds=back_s)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a duration such as 24h, 7d or 1h30m, or a time such as "
            "2026-01-01T00:00:00Z",
            param_hint="--since",
        ) from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if not _EARLIEST <= when < _LATEST:
        raise click.BadParameter(
            f"{value!r}: expected a time between {_EARLIEST.year} and {_LATEST.year - 1}",
            param_hint="--since",
        )
    return when


@cli.command()
@click.option("--since", "since", help="A duration back from now (24h, 7d) or a time (ISO 8601).")
@click.option("--by", type=click.Choice(["job", "queue", "user"]), default="job", show_default=True)
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.pass_context
def cost(ctx: click.Context, since: str | None, by: str, output: str) -> None:
    """What each job, queue or user was charged for the GPUs it held, and what leases cost."""
    report = _client(ctx).cost(since=_since(since), by=by)
    _emit([report], output, lambda wide: render.cost_table(report, now=_now()))


# -- identity and access -------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Contexts: which gpuctld, CA and token to use, by name (like kubectl config). The file
    is $GPUCTL_CONFIG or ~/.config/gpuctl/config.yaml; --context or GPUCTL_CONTEXT picks one
    for a command, flags override its fields."""


@config.command("get-contexts")
def config_get_contexts() -> None:
    """List the contexts; the current one is marked *."""
    current, found = contexts.load()
    rows = [
        ("*" if name == current else "", name, c.server, c.ca_file, c.token_file)
        for name, c in sorted(found.items())
    ]
    click.echo(render.table(["CURRENT", "NAME", "SERVER", "CA_FILE", "TOKEN_FILE"], rows))


@config.command("current-context")
def config_current_context() -> None:
    """Print the current context's name."""
    current, _ = contexts.load()
    if not current:
        raise click.ClickException("no current context (gpuctl config use-context NAME)")
    click.echo(current)


@config.command("use-context")
@click.argument("name")
def config_use_context(name: str) -> None:
    """Make NAME the current context."""
    _, found = contexts.load()
    if name not in found:
        known = ", ".join(sorted(found)) or "none yet"
        raise click.BadParameter(f"no context {name!r}; contexts: {known}", param_hint="NAME")
    path = contexts.save(name, found)
    click.echo(f"switched to context {name!r} ({path})")


@config.command("set-context")
@click.argument("name")
@click.option("--server", help="gpuctld: unix:/PATH or HOST:PORT[,HOST:PORT...].")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="CA to trust (TLS).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the token.")
@click.option("--use", "use_it", is_flag=True, help="Make it the current context too.")
def config_set_context(
    name: str, server: str | None, ca_file: str | None, token_file: str | None, use_it: bool
) -> None:
    """Create context NAME, or change the fields given of it."""
    current, found = contexts.load()
    old = found.get(name, contexts.Context(name))
    found[name] = contexts.Context(
        name,
        server=server if server is not None else old.server,
        # files named relative to where the command ran would break elsewhere
        ca_file=os.path.abspath(ca_file) if ca_file else old.ca_file,
        token_file=os.path.abspath(token_file) if token_file else old.token_file,
    )
    path = contexts.save(name if use_it or not current else current, found)
    click.echo(f"context {name!r} saved in {path}")


@config.command("delete-context")
@click.argument("name")
def config_delete_context(name: str) -> None:
    """Remove context NAME."""
    current, found = contexts.load()
    if found.pop(name, None) is None:
        raise click.BadParameter(f"no context {name!r}", param_hint="NAME")
    contexts.save("" if current == name else current, found)
    click.echo(f"context {name!r} deleted")


@cli.command()
@click.option("--client", "client_only", is_flag=True, help="Only this gpuctl's version.")
@click.pass_context
def version(ctx: click.Context, client_only: bool) -> None:
    """This gpuctl's version and the version of the gpuctld it talks to."""
    click.echo(f"client: {_own_version()}")
    if client_only:
        return
    settings = ctx.find_object(_Settings)
    me = _client(ctx).whoami()
    click.echo(f"server: {me.server_version or 'unknown (older than 0.1.0)'}")
    if settings is not None and settings.server:
        click.echo(f"at:     {settings.server}")


def _own_version() -> str:
    try:
        return importlib.metadata.version("gpuctl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell's completion script for gpuctl (commands, flags, and job ids and node
    names from gpuctld). bash: eval "$(gpuctl completion bash)" in ~/.bashrc; zsh: the same
    with zsh in ~/.zshrc; fish: gpuctl completion fish > ~/.config/fish/completions/gpuctl.fish"""
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None  # the three shells click knows
    click.echo(completer(cli, {}, "gpuctl", "_GPUCTL_COMPLETE").source())


@cli.command()
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.pass_context
def whoami(ctx: click.Context, output: str) -> None:
    """Who gpuctld takes you for, your role and what it permits."""
    me = _client(ctx).whoami()
    _emit([me], output, lambda wide: render.whoami(me))


def _ttl(value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: {e}", param_hint="--ttl") from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r}: must be longer than 0", param_hint="--ttl")
    return timedelta(seconds=seconds)


def _show_once(made: auth_pb2.CreateTokenResponse) -> None:
    """The secret on stdout (for a file or a variable), what it is on stderr."""
    click.echo(made.secret)
    t = made.token
    click.echo(f"{t.kind} token {t.id} for {t.principal}; shown only now", err=True)


@cli.group()
def token() -> None:
    """API tokens, for calling gpuctld from other hosts (GPUCTL_TOKEN)."""


@token.command("create")
@click.option("--user", default="", help="For this user (admins only; default: yourself).")
@click.option("--description", default="", help="What it is for, for `gpuctl token list`.")
@click.option("--ttl", help="How long it works, e.g. 30d or 12h (default: the server's, 90d).")
@click.pass_context
def token_create(ctx: click.Context, user: str, description: str, ttl: str | None) -> None:
    """Create a token; it is printed once, keep it like a password."""
    _show_once(_client(ctx).create_token(user=user, description=description, ttl=_ttl(ttl)))


@token.command("list")
@click.option("--user", default="", help="This user's tokens (admins; '*': everyone's).")
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.pass_context
def token_list(ctx: click.Context, user: str, output: str) -> None:
    """Your tokens (ids only: the secrets are never shown again)."""
    found = _client(ctx).tokens(user)
    _emit(found, output, lambda wide: render.tokens_table(found, now=_now()))


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke a token by id; it stops working at once."""
    gone = _client(ctx).revoke_token(token_id)
    click.echo(f"token {gone.id} revoked")


@cli.group()
def node() -> None:
    """Node credentials (operators)."""


@node.command("token")
@click.argument("name")
@click.option("--ttl", help="How long it works (default: until revoked or replaced).")
@click.pass_context
def node_token(ctx: click.Context, name: str, ttl: str | None) -> None:
    """Create the credential of NAME's agent (gpuctl-agent --token-file); the node's earlier
    credentials stop working."""
    _show_once(_client(ctx).create_node_token(name, ttl=_ttl(ttl)))


@node.command("join-token")
@click.argument("name")
@click.option("--ttl", help="How long it may be used (default: the server's, 1h); once only.")
@click.option(
    "--ca-out",
    type=click.Path(dir_okay=False, writable=True),
    help="Write gpuctld's CA certificate here, for the agent's --ca-file.",
)
@click.pass_context
def node_join_token(ctx: click.Context, name: str, ttl: str | None, ca_out: str | None) -> None:
    """Create a one-time token with which NAME's agent gets its certificate from gpuctld's CA:
    gpuctl-agent --join TOKEN --ca-file CA."""
    made = _client(ctx).create_join_token(name, ttl=_ttl(ttl))
    if ca_out:
        with open(ca_out, "wb") as f:
            f.write(made.ca_pem)
    _show_once(made)


@cli.command()
@click.option("--since", "since", help="A duration back from now (24h, 7d) or a time (ISO 8601).")
@click.option("-u", "--user", default="", help="Only this user's (or node's) calls.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("-o", "--output", type=_OUTPUT, default="table", show_default=True)
@click.pass_context
def audit(ctx: click.Context, since: str | None, user: str, limit: int, output: str) -> None:
    """Who changed what, when and from where (operators)."""
    when = _since(since)
    if isinstance(when, timedelta):
        when = _now() - when
    found = _client(ctx).audit(since=when, principal=user, limit=limit)
    _emit(found, output, lambda wide: render.audit_table(found))


cli.add_command(simulate)


def main() -> None:
    cli(prog_name="gpuctl")


if __name__ == "__main__":
    main()
