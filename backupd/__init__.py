"""backupd: scheduled backups of Docker volumes and databases."""

__version__ = "0.1.0"
