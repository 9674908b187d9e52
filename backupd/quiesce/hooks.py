"""User hooks: commands run before and after a backup, in a container or in backupd.

Each hook has a timeout that is enforced (the command is killed) and an
on_error policy: `fail` stops a before-hook phase and fails the run,
`continue` logs and goes on. After-hooks always run, even when the backup
failed; their output is logged.
"""

from __future__ import annotations

import logging

from backupd.config import Hook
from backupd.docker_host import DockerHost
from backupd.errors import BackupdError
from backupd.quiesce.runner import ContainerRunner, LocalRunner, Runner

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
                    log.info("%s %s: %s", label, stream, text.strip()[-2000:])
            if result.timed_out:
                problem = f"timed out after {hook.timeout.total_seconds():g}s"
            elif result.code != 0:
                problem = f"exited {result.code}: {result.stderr.strip()[-300:] or result.stdout.strip()[-300:]}"
            else:
                continue
        message = f"{label} ({' '.join(hook.argv)[:80]}) {problem}"
        if hook.on_error == "fail":
            raise HookError(message)
        log.warning("%s (on_error: continue)", message)
        errors.append(message)
    return errors
