"""User hooks: commands run before and after a backup, in a container or in backupd.

Each hook has a timeout that is enforced (the command is killed) and an
on_error policy: `fail` stops a before-hook phase and fails the run,
`continue` logs and goes on. After-hooks always run, even when the backup
failed; their output is logged. A secret in a command (a ${VAR} expanded into it) or in its
output is masked (backupd.redaction) before anything is cut to length or leaves the process.
"""

from __future__ import annotations

import logging

from backupd.config import Hook
from backupd.docker_host import DockerHost
from backupd.errors import BackupdError
from backupd.quiesce.runner import ContainerRunner, LocalRunner, Runner
from backupd.redaction import redact

log = logging.getLogger(__name__)


class HookError(BackupdError):
    pass


def runner_for(hook: Hook, host: DockerHost) -> Runner:
    return ContainerRunner(host, hook.container) if hook.container else LocalRunner()


def run_hooks(hooks: list[Hook], phase: str, host: DockerHost, where: str) -> list[str]:
    """Run hooks in order; raise HookError on a `fail` hook, return errors of `continue` ones."""
    errors = []
    for i, hook in enumerate(hooks):
        label = f"{where}.hooks.{phase}[{i}]"
        runner = runner_for(hook, host)
        log.info("%s: running %s in %s", label, hook.argv, runner.where)
        try:
            result = runner.run(hook.argv, {}, hook.timeout.total_seconds())
        except BackupdError as exc:
            problem = str(exc)
        else:
            for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
                if text.strip():
                    log.info("%s %s: %s", label, stream, redact(text.strip())[-2000:])
            if result.timed_out:
                problem = f"timed out after {hook.timeout.total_seconds():g}s"
            elif result.code != 0:
                problem = f"exited {result.code}: {_tail(result.stderr) or _tail(result.stdout)}"
            else:
                continue
        # Masked before it is cut: a secret cut in half would no longer be recognised.
        message = f"{label} ({redact(' '.join(hook.argv))[:80]}) {problem}"
        if hook.on_error == "fail":
            raise HookError(message)
        log.warning("%s (on_error: continue)", message)
        errors.append(message)
    return errors


def _tail(text: str, keep: int = 300) -> str:
    return redact(text.strip())[-keep:]
