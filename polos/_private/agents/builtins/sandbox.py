"""``sandbox_tools()``: exec, read, write, edit, glob and grep in a workspace directory.

Each call is one durable tool step of the agent's run: a completed call is recorded and a replay
(after a crash, on another worker) returns the recorded result without touching the files or
running the command again. Approvals (a command outside the allowlist, a path outside the
workspace) are ``ctx.step.suspend`` calls in the tool call's scope: the run waits for a human
holding no worker.

Two environments: ``local`` (commands run on this host, in the workspace) and ``docker`` (a
container with the workspace bind-mounted at ``/workspace``; files are read and written on the
host through the mount). Where no Docker daemon answers, the docker tools refuse every call with
a message that says so.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from polos._private.agents.tools import Tool, ToolRejectedError, current_tool_scope, decision

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution
    from polos.workflow import WorkflowContext

ToolName = Literal["exec", "read", "write", "edit", "glob", "grep"]
ALL_TOOLS: tuple[ToolName, ...] = ("exec", "read", "write", "edit", "glob", "grep")


_STRICT = ConfigDict(extra="forbid")  # an unknown option is an error, not ignored


class DockerEnvironmentConfig(BaseModel):
    model_config = _STRICT

    image: str = "node:20-slim"
    workspace_dir: str | None = None  # the host directory mounted at container_workdir
    container_workdir: str = "/workspace"
    env: dict[str, str] | None = None
    memory: str | None = None  # docker run --memory
    cpus: str | None = None  # docker run --cpus
    network: str = "none"
    setup_command: str | None = None  # run once after the container is created


class LocalEnvironmentConfig(BaseModel):
    model_config = _STRICT

    cwd: str | None = None  # the workspace; default $POLOS_WORKSPACES_DIR/<prefix>/<sandbox>
    # Paths outside it need a human's approval; False: no restriction; None: the workspace.
    path_restriction: str | Literal[False] | None = None


class ExecToolConfig(BaseModel):
    model_config = _STRICT

    # allow-always: run every command; allowlist: run those matching a pattern, ask for the
    # rest; approval-always: ask for each (the local default).
    security: Literal["allow-always", "allowlist", "approval-always"] | None = None
    allowlist: list[str] | None = None  # glob patterns: "ls", "cat *", "node *"
    timeout: int | None = None  # seconds, default 300
    max_output_chars: int | None = None  # default 100000


class E2BEnvironmentConfig(BaseModel):
    model_config = _STRICT

    template: str | None = None
    api_key: str | None = None
    timeout: int | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    setup_command: str | None = None


class SandboxToolsConfig(BaseModel):
    model_config = _STRICT

    env: Literal["local", "docker", "e2b"] | None = None  # None: docker
    scope: Literal["execution", "session"] | None = None  # None: execution
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    idle_destroy_timeout: str | None = None
    cwd: str | None = None  # the workspace directory (either environment)
    tools: list[ToolName] | None = None
    docker: DockerEnvironmentConfig | None = None
    e2b: E2BEnvironmentConfig | None = None
    local: LocalEnvironmentConfig | None = None
    exec: ExecToolConfig | None = None
    file_approval: Literal["always", "none"] | None = None


class SandboxUnavailableError(RuntimeError):
    """The sandbox's environment cannot run here (no Docker daemon, say)."""


class ExecResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int
    truncated: bool = False


# --------------------------------------------------------------------------- output shaping

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def truncate_output(text: str, limit: int) -> tuple[str, bool]:
    """Keep 20 % from the head and 80 % from the tail of an output longer than ``limit``."""
    if len(text) <= limit:
        return text, False
    head = limit // 5
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n\n--- truncated {cut} characters ---\n\n{text[-tail:]}", True


def is_binary(data: bytes) -> bool:
    return b"\x00" in data[:8192]


# Shell syntax that chains, substitutes or redirects: a command using any of it is never
# allowed by a pattern (``node *`` must not allow ``node x; rm -rf ~``).
_SHELL_META = re.compile(r"[;&|`$<>(){}\n\r\\]")


def evaluate_allowlist(command: str, allowlist: list[str]) -> bool:
    """Whether ``command`` runs without approval: no shell metacharacters, and it matches one
    pattern whole (``*`` is any text)."""
    cmd = command.strip()
    if not cmd or _SHELL_META.search(cmd):
        return False
    for pattern in allowlist:
        regex = "^" + ".*".join(re.escape(part) for part in pattern.strip().split("*")) + "$"
        if re.match(regex, cmd, re.DOTALL):
            return True
    return False


# --------------------------------------------------------------------------- environments


class ExecutionEnvironment(ABC):
    """Where the sandbox runs commands; files live in ``workspace`` on this host."""

    kind: str

    def __init__(self, workspace: Path, workdir: str) -> None:
        self.workspace = workspace
        self.workdir = workdir  # the workspace as the commands see it

    @abstractmethod
    async def exec(
        self, command: str, cwd: str | None, env: dict[str, str] | None, timeout: float
    ) -> tuple[int, str, str, bool]:
        """(exit code, stdout, stderr, timed out)."""

    @abstractmethod
    def host_path(self, path: str | None) -> Path:
        """The host path for a path the model gave (relative paths are in the workspace)."""

    def shown(self, host: Path) -> str:
        """A host path as the model should see it."""
        return str(host)


class LocalEnvironment(ExecutionEnvironment):
    kind = "local"

    def __init__(self, workspace: Path) -> None:
        super().__init__(workspace, str(workspace))

    async def exec(
        self, command: str, cwd: str | None, env: dict[str, str] | None, timeout: float
    ) -> tuple[int, str, str, bool]:
        proc = await asyncio.create_subprocess_shell(
            command,
            cwd=str(self.host_path(cwd)),
            env={**_host_env(), **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            _kill_group(proc.pid)
            out, err = await proc.communicate()
            return 137, out.decode(errors="replace"), err.decode(errors="replace"), True
        return (
            int(proc.returncode or 0),
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            False,
        )

    def host_path(self, path: str | None) -> Path:
        p = Path(os.path.expanduser(path)) if path else self.workspace
        if not p.is_absolute():
            p = self.workspace / p
        return Path(os.path.realpath(p))


_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|NATS", re.IGNORECASE)


def _host_env() -> dict[str, str]:
    """The worker's environment without its secrets: a command the model wrote must not read
    the worker's NATS credentials or API keys."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("POLOS_") and not _SECRET.search(k)
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def docker_status() -> str | None:
    """None when a Docker daemon answers here, else why not (one line)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (not on PATH)"
    try:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker version failed: {exc}"
    if done.returncode != 0:
        return f"no Docker daemon answers: {(done.stderr or done.stdout).strip()[:300]}"
    return None


class DockerEnvironment(ExecutionEnvironment):
    kind = "docker"

    def __init__(self, workspace: Path, config: DockerEnvironmentConfig, name: str) -> None:
        super().__init__(workspace, config.container_workdir.rstrip("/") or "/")
        self.config = config
        self.name = name
        self._ready = False

    async def _docker(self, *args: str, timeout: float = 120) -> tuple[int, str, str, bool]:
        proc = await asyncio.create_subprocess_exec(
            "docker",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            return 137, out.decode(errors="replace"), err.decode(errors="replace"), True
        return (
            int(proc.returncode or 0),
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            False,
        )

    async def ensure(self) -> None:
        """The container, created on first use (or after it died); one per sandbox."""
        if self._ready:
            code, out, _, _ = await self._docker(
                "inspect", "-f", "{{.State.Running}}", self.name, timeout=30
            )
            if code == 0 and out.strip() == "true":
                return
        reason = await asyncio.to_thread(docker_status)
        if reason is not None:
            raise SandboxUnavailableError(
                f"sandbox_tools(env='docker') needs a Docker daemon, and {reason}: start Docker "
                "here, or use SandboxToolsConfig(env='local')"
            )
        code, out, _, _ = await self._docker(
            "inspect", "-f", "{{.State.Running}}", self.name, timeout=30
        )
        if code == 0 and out.strip() == "true":
            self._ready = True
            return
        await self._docker("rm", "-f", self.name, timeout=60)
        c = self.config
        args = ["run", "-d", "--name", self.name, "-v", f"{self.workspace}:{self.workdir}:rw"]
        args += ["-w", self.workdir, "--network", c.network, "--label", "polos.managed=true"]
        if c.memory:
            args += ["--memory", c.memory]
        if c.cpus:
            args += ["--cpus", c.cpus]
        for k, v in (c.env or {}).items():
            args += ["-e", f"{k}={v}"]
        code, _, err, _ = await self._docker(*args, c.image, "sleep", "infinity", timeout=600)
        if code != 0:
            raise SandboxUnavailableError(f"docker run {c.image} failed: {err.strip()[:500]}")
        if c.setup_command:
            code, out, err, _ = await self._docker(
                "exec", self.name, "sh", "-c", c.setup_command, timeout=600
            )
            if code != 0:
                raise SandboxUnavailableError(
                    f"the sandbox's setup_command exited {code}: {(err or out).strip()[:500]}"
                )
        self._ready = True

    async def exec(
        self, command: str, cwd: str | None, env: dict[str, str] | None, timeout: float
    ) -> tuple[int, str, str, bool]:
        await self.ensure()
        args = ["exec", "-w", self.container_path(cwd)]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        # Killing `docker exec` does not stop the command: `timeout` inside the container does.
        return await self._docker(
            *args,
            self.name,
            "timeout",
            "-s",
            "KILL",
            str(int(timeout)),
            "sh",
            "-c",
            command,
            timeout=timeout + 30,
        )

    def container_path(self, path: str | None) -> str:
        p = Path(path) if path else Path(self.workdir)
        if not p.is_absolute():
            p = Path(self.workdir) / p
        return os.path.normpath(str(p))

    def host_path(self, path: str | None) -> Path:
        inside = Path(self.container_path(path))
        root = Path(self.workdir)
        if inside != root and root not in inside.parents:
            raise ValueError(
                f"{path!r} is outside the sandbox's {self.workdir}: only the workspace is "
                "reachable from the file tools"
            )
        host = self.workspace / inside.relative_to(root)
        return Path(os.path.realpath(host))

    def shown(self, host: Path) -> str:
        try:
            return str(Path(self.workdir) / host.relative_to(self.workspace))
        except ValueError:
            return str(host)


_ENVIRONMENTS: dict[str, ExecutionEnvironment] = {}


def workspaces_dir() -> Path:
    return Path(os.environ.get("POLOS_WORKSPACES_DIR") or "~/.polos/workspaces").expanduser()


def _sandbox_key(cfg: SandboxToolsConfig, exe: RunExecution) -> str:
    """Which sandbox a call uses: the configured id, the session's (``scope="session"``), or the
    root run's - the same on every replay and every worker."""
    if cfg.id:
        return cfg.id
    if cfg.scope == "session":
        scope = current_tool_scope()
        session = scope.session_id if scope is not None else None
        if not session:
            raise ValueError(
                "SandboxToolsConfig(scope='session') needs a session: give the agent run one "
                "(agent.with_input(..., session=...))"
            )
        return f"session-{session}"
    requested = exe.state.requested
    return (requested.root_run_id if requested else None) or exe.run_id


def _safe(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", token)[:100]


def environment(cfg: SandboxToolsConfig, exe: RunExecution) -> ExecutionEnvironment:
    key = _sandbox_key(cfg, exe)
    configured = cfg.cwd or (cfg.local.cwd if cfg.local else None)
    if cfg.env == "docker" or cfg.env is None:
        configured = (cfg.docker.workspace_dir if cfg.docker else None) or cfg.cwd
    workspace = (
        Path(configured).expanduser()
        if configured
        else workspaces_dir() / _safe(exe.names.prefix) / _safe(key)
    )
    workspace.mkdir(parents=True, exist_ok=True)
    workspace = Path(os.path.realpath(workspace))
    cache_key = f"{cfg.env or 'docker'}:{workspace}"
    env = _ENVIRONMENTS.get(cache_key)
    if env is None:
        if cfg.env == "local":
            env = LocalEnvironment(workspace)
        else:
            digest = hashlib.sha1(f"{exe.names.prefix}/{key}".encode()).hexdigest()[:12]
            env = DockerEnvironment(
                workspace, cfg.docker or DockerEnvironmentConfig(), f"polos-sandbox-{digest}"
            )
        _ENVIRONMENTS[cache_key] = env
    return env


# --------------------------------------------------------------------------- approvals


def _approval_fields() -> list[dict[str, Any]]:
    return [
        {"key": "approved", "type": "boolean", "label": "Approve?", "required": True},
        {
            "key": "feedback",
            "type": "textarea",
            "label": "Feedback for the agent (optional)",
            "required": False,
        },
    ]


def _restriction(cfg: SandboxToolsConfig, env: ExecutionEnvironment) -> Path | None:
    if cfg.file_approval == "none":
        return None
    if isinstance(env, LocalEnvironment) and cfg.local is not None:
        if cfg.local.path_restriction is False:
            return None
        if cfg.local.path_restriction:
            return Path(os.path.realpath(Path(cfg.local.path_restriction).expanduser()))
    return env.workspace


async def _approve_path(
    ctx: WorkflowContext, cfg: SandboxToolsConfig, env: ExecutionEnvironment, tool: str, p: Path
) -> None:
    """A path outside the restriction (symlinks resolved) runs only once a human approves."""
    limit = _restriction(cfg, env)
    if limit is None or p == limit or limit in p.parents:
        return
    answer = await ctx.step.suspend(
        f"approve_{tool}",
        {
            "_form": {
                "title": f"{tool}: access outside workspace",
                "description": f'The agent wants to {tool} "{p}", outside {limit}.',
                "fields": _approval_fields(),
                "context": {"tool": tool, "path": str(p), "restriction": str(limit)},
            },
            "_source": "path_approval",
            "_tool": tool,
        },
    )
    approved, feedback = decision(answer.data)
    if not approved:
        raise ToolRejectedError(
            f'Access to "{p}" was rejected by the user.'
            + (f" Feedback: {feedback}" if feedback else "")
        )


# --------------------------------------------------------------------------- the tools


class ExecInput(BaseModel):
    command: str = Field(description="The shell command to run")
    cwd: str | None = Field(default=None, description="Working directory (default: workspace)")
    env: dict[str, str] | None = Field(default=None, description="Extra environment variables")
    timeout: int | None = Field(default=None, ge=1, description="Seconds before it is killed")


class ReadInput(BaseModel):
    path: str = Field(description="The file (relative paths are in the workspace)")
    offset: int | None = Field(default=None, ge=0, description="First line, 0-based")
    limit: int | None = Field(default=None, ge=1, description="How many lines")


class WriteInput(BaseModel):
    path: str = Field(description="The file (relative paths are in the workspace)")
    content: str = Field(description="The whole new content")


class EditInput(BaseModel):
    path: str = Field(description="The file (relative paths are in the workspace)")
    old_text: str = Field(description="Text to replace (its first occurrence), exactly")
    new_text: str = Field(description="The replacement")


class GlobInput(BaseModel):
    pattern: str = Field(description="A glob relative to cwd, e.g. '*.py' or 'src/**/*.js'")
    cwd: str | None = Field(default=None, description="Where to search (default: workspace)")
    ignore: list[str] | None = Field(default=None, description="Globs of paths to leave out")


class GrepInput(BaseModel):
    pattern: str = Field(description="A regular expression")
    cwd: str | None = Field(default=None, description="Where to search (default: workspace)")
    include: list[str] | None = Field(default=None, description="File name globs to search")
    max_results: int | None = Field(default=None, ge=1, description="At most this many (100)")
    context_lines: int | None = Field(default=None, ge=0, le=20, description="Lines around")


_MAX_FILES = 1000


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", "node_modules"))
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def sandbox_tools(config: SandboxToolsConfig | None = None) -> list[Tool]:
    """The sandbox's tools (all six, or ``config.tools``), sharing one workspace per agent run
    (``scope="session"``: per session)."""
    cfg = config or SandboxToolsConfig()
    if cfg.env == "e2b" or cfg.e2b is not None:
        raise NotImplementedError(
            "sandbox_tools: env='e2b' is not supported here; use env='docker' or env='local'"
        )
    if cfg.idle_destroy_timeout is not None:
        raise NotImplementedError(
            "sandbox_tools: idle_destroy_timeout is not supported here: a session's workspace "
            "stays on disk until you remove it"
        )
    if cfg.env == "local" and cfg.docker is not None:
        raise ValueError("sandbox_tools: docker= is set but env='local'")
    if cfg.env == "docker" and cfg.local is not None:
        raise ValueError("sandbox_tools: local= is set but env='docker'")
    exec_cfg = cfg.exec or ExecToolConfig()
    security = exec_cfg.security or ("approval-always" if cfg.env == "local" else "allow-always")
    if security == "allowlist" and not exec_cfg.allowlist:
        raise ValueError("sandbox_tools: exec security='allowlist' needs exec.allowlist")
    timeout = exec_cfg.timeout or 300
    max_chars = exec_cfg.max_output_chars or 100_000
    gate = cfg.file_approval == "always"

    def env_of(ctx: WorkflowContext) -> ExecutionEnvironment:
        return environment(cfg, ctx._x)

    async def exec(ctx: WorkflowContext, input: ExecInput) -> dict[str, Any]:
        env = env_of(ctx)
        command = input.command.strip()
        needs = security == "approval-always" or (
            security == "allowlist" and not evaluate_allowlist(command, exec_cfg.allowlist or [])
        )
        if needs:
            answer = await ctx.step.suspend(
                "approve_exec",
                {
                    "_form": {
                        "title": "Approve command execution",
                        "description": f"The agent wants to run: {command}",
                        "fields": _approval_fields(),
                        "context": {
                            "command": command,
                            "cwd": input.cwd or env.workdir,
                            "environment": env.kind,
                        },
                    },
                    "_source": "exec_security",
                    "_tool": "exec",
                },
            )
            approved, feedback = decision(answer.data)
            if not approved:
                return ExecResult(
                    exit_code=-1,
                    stdout="",
                    stderr=f"Command rejected by user: {command}"
                    + (f"\nUser feedback: {feedback}" if feedback else ""),
                    duration_ms=0,
                ).model_dump()
        t0 = time.perf_counter()
        code, out, err, killed = await env.exec(
            command, input.cwd, input.env, float(input.timeout or timeout)
        )
        if killed:
            err += "\n[Process killed: timeout exceeded]"
        out, cut_out = truncate_output(strip_ansi(out), max_chars)
        err, cut_err = truncate_output(strip_ansi(err), max_chars)
        return ExecResult(
            exit_code=code,
            stdout=out,
            stderr=err,
            duration_ms=round((time.perf_counter() - t0) * 1000),
            truncated=cut_out or cut_err,
        ).model_dump()

    async def read(ctx: WorkflowContext, input: ReadInput) -> dict[str, Any]:
        env = env_of(ctx)
        p = env.host_path(input.path)
        await _approve_path(ctx, cfg, env, "read", p)
        data = p.read_bytes()
        if is_binary(data):
            raise ValueError(f"{env.shown(p)} is a binary file; read reads text files")
        text = data.decode(errors="replace")
        if input.offset is not None or input.limit is not None:
            lines = text.splitlines(keepends=True)
            start = input.offset or 0
            text = "".join(lines[start : start + input.limit if input.limit else None])
        return {"content": text, "path": env.shown(p)}

    async def write(ctx: WorkflowContext, input: WriteInput) -> dict[str, Any]:
        env = env_of(ctx)
        p = env.host_path(input.path)
        if not gate:
            await _approve_path(ctx, cfg, env, "write", p)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(input.content)
        return {"success": True, "path": env.shown(p)}

    async def edit(ctx: WorkflowContext, input: EditInput) -> dict[str, Any]:
        env = env_of(ctx)
        p = env.host_path(input.path)
        if not gate:
            await _approve_path(ctx, cfg, env, "edit", p)
        text = p.read_text()
        if input.old_text not in text:
            raise ValueError(
                f"old_text not found in {env.shown(p)}. Make sure the text matches exactly, "
                "including whitespace and indentation."
            )
        p.write_text(text.replace(input.old_text, input.new_text, 1))
        return {"success": True, "path": env.shown(p)}

    async def glob(ctx: WorkflowContext, input: GlobInput) -> dict[str, Any]:
        env = env_of(ctx)
        root = env.host_path(input.cwd)
        await _approve_path(ctx, cfg, env, "glob", root)
        if Path(input.pattern).is_absolute() or ".." in Path(input.pattern).parts:
            raise ValueError("glob: the pattern is relative to cwd (no '..', not absolute)")
        found = sorted(
            str(f)
            for f in root.glob(input.pattern)
            if f.is_file()
            and not any(fnmatch.fnmatch(str(f.relative_to(root)), i) for i in input.ignore or [])
        )
        return {"files": [env.shown(Path(f)) for f in found[:_MAX_FILES]]}

    async def grep(ctx: WorkflowContext, input: GrepInput) -> dict[str, Any]:
        env = env_of(ctx)
        root = env.host_path(input.cwd)
        await _approve_path(ctx, cfg, env, "grep", root)
        try:
            regex = re.compile(input.pattern)
        except re.error as exc:
            raise ValueError(
                f"grep: {input.pattern!r} is not a regular expression: {exc}"
            ) from None
        limit = input.max_results or 100
        around = input.context_lines or 0
        matches: list[dict[str, Any]] = []
        files = [root] if root.is_file() else _walk(root)
        for f in files:
            if input.include and not any(fnmatch.fnmatch(f.name, i) for i in input.include):
                continue
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if is_binary(data):
                continue
            lines = data.decode(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if regex.search(line):
                    m: dict[str, Any] = {"path": env.shown(f), "line": i + 1, "text": line}
                    if around:
                        m["context"] = lines[max(0, i - around) : i + around + 1]
                    matches.append(m)
                    if len(matches) >= limit:
                        return {"matches": matches}
        return {"matches": matches}

    descriptions = {
        "exec": "Run a shell command in the sandbox's workspace; returns exit code, stdout "
        "and stderr.",
        "read": "Read a text file (optionally a range of lines).",
        "write": "Write a file (created with its directories, or replaced).",
        "edit": "Replace the first occurrence of old_text with new_text in a file.",
        "glob": "Find files by glob pattern (** for any depth).",
        "grep": "Search file contents with a regular expression; returns matching lines.",
    }
    functions: dict[str, Callable[..., Any]] = {
        "exec": exec,
        "read": read,
        "write": write,
        "edit": edit,
        "glob": glob,
        "grep": grep,
    }
    chosen = cfg.tools or list(ALL_TOOLS)
    return [
        Tool.from_function(
            functions[name],
            id=name,
            description=descriptions[name],
            approval="always" if gate and name in ("write", "edit") else None,
        )
        for name in chosen
    ]


__all__ = [
    "DockerEnvironment",
    "DockerEnvironmentConfig",
    "E2BEnvironmentConfig",
    "ExecResult",
    "ExecToolConfig",
    "ExecutionEnvironment",
    "LocalEnvironment",
    "LocalEnvironmentConfig",
    "SandboxToolsConfig",
    "SandboxUnavailableError",
    "docker_status",
    "evaluate_allowlist",
    "sandbox_tools",
    "strip_ansi",
    "truncate_output",
]
