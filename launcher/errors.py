"""The one exception the launcher raises for problems the user can fix."""


class LauncherError(Exception):
    """Bad flags, an impossible core plan or a missing library; ``main`` prints it and exits 1."""
