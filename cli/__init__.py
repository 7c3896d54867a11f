"""cli/: the `kronograph` command (click)."""
