"""The only code that runs kernel tools or speaks netlink, each behind a small interface."""
