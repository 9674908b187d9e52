"""`python -m backupd` and the `backupd` command."""

import gc


def run() -> int:
    """Start backupd with the cycle collector off while its libraries load.

    Imports make a few hundred thousand objects that live until exit; collecting
    them again and again as they pile up cost about a tenth of start-up (0.03 s
    here). cli.main freezes them and turns the collector back on.
    """
    gc.disable()
    from backupd.cli import main

    return main()


if __name__ == "__main__":
    raise SystemExit(run())
