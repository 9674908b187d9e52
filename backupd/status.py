"""The names of backup and copy statuses: one owner for what the catalog records and retention,
tables and notifications read."""

# Backup statuses.
RUNNING, SUCCEEDED, PARTIAL, FAILED = "running", "succeeded", "partial", "failed"
SUSPICIOUS = "suspicious"  # how tables and retention show a succeeded backup the shrinkage guard flagged
# Copy statuses.
PENDING, STORED, COPY_FAILED, DELETED, MISSING = "pending", "stored", "failed", "deleted", "missing"
